"""The suites' model-backed scorers on tiny random-init models saved to tmp and loaded through the real code:
GenEval's CLIP colour classifier (its zero-shot classifier recomputed here from CLIPModel's own features),
T2I-CompBench's BLIP-VQA (the batched, padded questions against one-at-a-time unpadded runs of the model's
own modules) and VBench's DINO features (against ViTModel's forward)."""

import pytest
import torch
import torch.nn.functional as F

from fastvideo_grpo.benchmarks.colour import BACKGROUND, TEMPLATES, ClipColourClassifier, masked_crop
from fastvideo_grpo.benchmarks.detection import Detection
from fastvideo_grpo.benchmarks.geneval_rules import COLORS
from support.tiny_benchmarks import blip_vqa_dir, clip_dir, dino_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    return {"clip": clip_dir(root / "clip"), "blip": blip_vqa_dir(root / "blip"), "dino": dino_dir(root / "dino")}


def test_masked_crop_composites_over_grey_and_crops_the_rounded_box():
    img = torch.rand(3, 10, 12)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:6] = True
    crop = masked_crop(img, Detection((2.6, 1.4, 7.5, 6.2), 1.0, mask))  # rounded: x 3..8, y 1..6 (exclusive)
    assert crop.shape == (3, 5, 5)
    ref = torch.full((3, 10, 12), BACKGROUND)
    ref[:, mask] = img[:, mask]
    assert torch.equal(crop, ref[:, 1:6, 3:8])
    assert torch.equal(masked_crop(img, Detection((0, 0, 12, 10), 1.0)), img)  # no mask: the whole box


def test_clip_colour_classifier_is_geneval_zero_shot(models):
    from transformers import CLIPModel, CLIPTokenizer

    from fastvideo_grpo.rewards._clip_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess

    cc = ClipColourClassifier(models["clip"], device="cpu")
    model = CLIPModel.from_pretrained(models["clip"]).eval()
    tok = CLIPTokenizer.from_pretrained(models["clip"])

    def text(t):
        ids = tok(t, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        out = model.get_text_features(**ids)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out, dim=-1)

    with torch.no_grad():
        ref = torch.stack([F.normalize(text([tp.format(c=c, name="car") for tp in TEMPLATES]).mean(0), dim=-1)
                           for c in COLORS])
        torch.testing.assert_close(cc.classifier("car"), ref, rtol=1e-5, atol=1e-6)
        g = torch.Generator().manual_seed(1)
        image = torch.rand(3, 40, 40, generator=g)
        dets = [Detection((i * 6.0, 0.0, i * 6.0 + 20, 30.0), 1.0) for i in range(4)]
        feats = []
        for d in dets:
            x = preprocess(image[:, 0:30, int(d.box[0]):int(d.box[2])].unsqueeze(0), 32, OPENAI_CLIP_MEAN,
                           OPENAI_CLIP_STD)
            out = model.get_image_features(pixel_values=x)
            feats.append(F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1))
        expected = [COLORS[i] for i in (torch.cat(feats) @ ref.T).argmax(1).tolist()]
    assert cc(image, dets, "car") == expected and cc(image, [], "car") == []


def test_blip_vqa_yes_probability_and_attribute_product(models):
    from fastvideo_grpo.benchmarks.blip_vqa import BlipVqa

    vqa = BlipVqa(models["blip"], device="cpu", batch_size=4)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 40, 48, generator=g)
    questions = ["a red car?", "a green bench?", "two blue squares and a cat?"]  # different lengths: padding
    got = vqa.yes_probability(images, questions)
    m = vqa.model
    ref = []
    with torch.no_grad():
        for img, q in zip(images, questions):
            ids = vqa.tokenizer(q, return_tensors="pt")
            emb = m.vision_model(pixel_values=vqa.pixels(img.unsqueeze(0)))[0]
            qe = m.text_encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                encoder_hidden_states=emb)[0]
            logits = m.text_decoder(input_ids=torch.tensor([[m.config.text_config.bos_token_id]]),
                                    encoder_hidden_states=qe).logits[0, 0]
            p = logits.softmax(-1)
            yes, no = vqa.tokenizer.convert_tokens_to_ids(["yes", "no"])
            ref.append(float(p[yes] / (p[yes] + p[no])))
    torch.testing.assert_close(got, torch.tensor(ref), rtol=1e-4, atol=1e-5)
    assert len(set(round(x, 4) for x in ref)) > 1  # the tiny model's answer depends on its inputs
    scores = vqa.attribute_scores(images[:2], ["a red car and a green bench", "a blue cup"])
    pa = vqa.yes_probability(images[:1].repeat(2, 1, 1, 1), ["a red car?", "a green bench?"])
    pb = vqa.yes_probability(images[1:2], ["a blue cup?"])
    assert scores[0] == pytest.approx(float(pa.prod()), rel=1e-5) and scores[1] == pytest.approx(float(pb[0]), rel=1e-5)


def test_dino_features_are_vit_cls_tokens_on_resized_frames(models):
    from transformers import ViTModel

    from fastvideo_grpo.benchmarks.vbench import IMAGENET_MEAN, IMAGENET_STD, DinoFeatures, consistency

    dino = DinoFeatures(models["dino"], device="cpu", size=32)
    frames = torch.rand(4, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    vit = ViTModel.from_pretrained(models["dino"], add_pooling_layer=False).eval()
    x = F.interpolate(frames, size=(32, 53), mode="bilinear", align_corners=False)  # short side 24 -> 32
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = vit(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    torch.testing.assert_close(dino(frames), ref, rtol=1e-5, atol=1e-6)
    assert 0.0 < consistency(dino(frames)) < 1.0
    assert consistency(dino(frames[:1].repeat(3, 1, 1, 1))) == pytest.approx(1.0)  # a still video
