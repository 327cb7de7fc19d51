"""Prompt-embedding preprocessing (fastvideo_grpo.data) on tiny random-init encoders, CPU only.

Tiny encoder folders are written with ``save_pretrained`` and read back through the real
``from_pretrained(local_path, local_files_only=True)`` code. Covered: prompt-file parsing and its errors;
each family's encodings against the diffusers pipeline's own ``encode_prompt`` on the same components
(sd, flux, hunyuan, wan, sd3, qwen_image, flux2_klein, flux2_dev, z_image; wan_i2v image condition / CLIP image embeds against
WanImageToVideoPipeline; qwen_image_edit's image + instruction embedding and reference latent against
QwenImageEditPipeline with the real Qwen2VLProcessor); bit-exact round trip through the shards; byte-identical reruns; resume
skipping finished shards and redoing a corrupted one; ``validate_manifest`` errors; the dataset's
split, shard cache and collate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from fastvideo_grpo.data import (PromptEmbeddingDataset, collate_prompt_embeddings, is_eval_prompt,  # noqa: E402
                                 load_manifest, read_prompts, validate_manifest)
from fastvideo_grpo.data.encoders import FamilyEncoder, load_family_encoder  # noqa: E402
from fastvideo_grpo.data.prep import main as prep_main  # noqa: E402
from fastvideo_grpo.models.hunyuan_video import HUNYUAN_PROMPT_TEMPLATE  # noqa: E402
from fastvideo_grpo.models.qwen_image import QWEN_IMAGE_PROMPT_TEMPLATE  # noqa: E402
from fastvideo_grpo.models.qwen_image_edit import QWEN_IMAGE_EDIT_PROMPT_TEMPLATE  # noqa: E402
from support.tiny_encoders import (CLIP_DIMS, LLAMA_DIM, MISTRAL3_DIM, QWEN3_DIM, QWEN_VL_DIM, T5_DIM,  # noqa: E402
                                   build_tiny_components)
from support.tiny_models import WAN22_Z  # noqa: E402

PROMPTS = ["a red circle", "two blue squares on the left", "the cat and the dog", "a photo of a star",
           "three green triangles", "a big dark forest"]
T5_LEN = 12
LLAMA_LEN = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (folder, in-memory components); built lazily once per module."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = (root / family, build_tiny_components(family, root / family))
        return cache[family]

    return get


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _prep(folder, prompts_file, out, family="sd", *extra):
    args = ["--family", family, "--model-path", str(folder), "--prompts", str(prompts_file), "--out", str(out),
            "--shard-size", "2", "--batch-size", "2", "--dtype", "float32", "--no-progress",
            "--t5-max-length", str(T5_LEN), "--llama-max-length", str(LLAMA_LEN), "--qwen-max-length", str(LLAMA_LEN),
            "--crop-start", "auto", *extra]
    return prep_main(args)


def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- prompt files


def test_read_prompts_formats(tmp_path):
    txt = _write(tmp_path / "p.txt", "a red circle\n\n  two dogs  \r\nthe sky\n")
    assert [r.prompt for r in read_prompts(txt)] == ["a red circle", "two dogs", "the sky"]
    jl = _write(tmp_path / "p.jsonl", '{"prompt": "a", "x": 1}\n\n{"prompt": "b"}\n')
    assert [r.prompt for r in read_prompts(jl)] == ["a", "b"]
    jl2 = _write(tmp_path / "q.jsonl", '{"caption": "a"}\n')
    assert [r.prompt for r in read_prompts(jl2, field="caption")] == ["a"]
    csv_ = _write(tmp_path / "p.csv", 'id,prompt,image\n1,"a, b",img.png\n2,c,/abs/x.png\n')
    recs = read_prompts(csv_, image_field="image")
    assert [r.prompt for r in recs] == ["a, b", "c"]
    assert recs[0].image == str(tmp_path / "img.png") and recs[1].image == "/abs/x.png"


def test_released_prompt_set_folders(tiny, tmp_path):
    """The released Flow-GRPO / DiffusionNFT prompt sets (dataset/pickscore, dataset/ocr: <split>.txt;
    dataset/geneval: <split>_metadata.jsonl with tag / include beside the prompt) are read by folder and split,
    by read_prompts and by the data prep CLI (--prompts <folder> --split)."""
    from fastvideo_grpo.data.prompts import prompt_file

    pick = tmp_path / "pickscore"
    pick.mkdir()
    _write(pick / "train.txt", "a cat on a mat\na red bus\n")
    _write(pick / "test.txt", "a blue car\n")
    gen = tmp_path / "geneval"
    gen.mkdir()
    _write(gen / "train_metadata.jsonl",
           '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}\n'
           '{"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}\n')
    assert prompt_file(pick, "test") == pick / "test.txt" and prompt_file(pick / "train.txt") == pick / "train.txt"
    assert [r.prompt for r in read_prompts(prompt_file(gen, "train"))] == ["a photo of a bench", "a photo of two dogs"]
    with pytest.raises(FileNotFoundError, match="neither test.txt nor test_metadata.jsonl"):
        prompt_file(gen, "test")
    _write(gen / "train.txt", "x\n")
    with pytest.raises(FileNotFoundError, match="both"):
        prompt_file(gen, "train")
    (gen / "train.txt").unlink()
    folder, _ = tiny("sd")
    res = _prep(folder, gen, tmp_path / "out", "sd", "--split", "train")
    assert res["written"] == 1  # 2 prompts, shards of 2
    m = load_manifest(tmp_path / "out")
    assert m["header"]["source"]["file"] == "train_metadata.jsonl" and m["header"]["num_prompts"] == 2


@pytest.mark.parametrize("name,content,kwargs,match", [
    ("empty.txt", "", {}, r"empty\.txt: no prompts found"),
    ("blank.txt", "\n \n", {}, r"no prompts found"),
    ("blank2.txt", "a\n\nb\n", {"blank_lines": "error"}, r"blank2\.txt:2: blank line"),
    ("nofield.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', {}, r"nofield\.jsonl:2: missing field 'prompt'"),
    ("badjson.jsonl", '{"prompt": "a"}\n{"prompt": \n', {}, r"badjson\.jsonl:2: invalid JSON"),
    ("notstr.jsonl", '{"prompt": 3}\n', {}, r"notstr\.jsonl:1: field 'prompt' must be a string"),
    ("emptyprompt.jsonl", '{"prompt": "  "}\n', {}, r"emptyprompt\.jsonl:1: field 'prompt' is empty"),
    ("nocol.csv", "text\nhello\n", {}, r"nocol\.csv:1: no 'prompt' column"),
    ("ragged.csv", "prompt,x\na,1\nb\n", {}, r"ragged\.csv:3: 1 columns"),
    ("empty.csv", "", {}, r"empty CSV"),
    ("p.tsv", "a\n", {}, r"unsupported prompt file type"),
    ("img.txt", "a\n", {"image_field": "image"}, r"cannot name reference images"),
    ("noimg.jsonl", '{"prompt": "a"}\n', {"image_field": "image"}, r"noimg\.jsonl:1: field 'image'"),
])
def test_read_prompts_errors(tmp_path, name, content, kwargs, match):
    p = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=match):
        read_prompts(p, **kwargs)


def test_read_prompts_non_utf8_and_missing(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt:2: not valid UTF-8"):
        read_prompts(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_toy_prompt_file_matches_grammar():
    from fastvideo_grpo.toy.shapes import all_prompts

    path = Path(__file__).resolve().parents[2] / "data_prep" / "prompts" / "toy_shapes.txt"
    assert [r.prompt for r in read_prompts(path)] == all_prompts()


# ----------------------------------------------------------------------------- encodings vs diffusers


def _assert_same(a, b, exact=True):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if exact:
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sd_matches_pipeline(tiny):
    folder, c = tiny("sd")
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                             unet=None, scheduler=None, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pe, ne = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True, negative_prompt=None)
    enc = load_family_encoder("sd", folder)  # through from_pretrained
    out = enc.encode_text(PROMPTS[:2])
    assert set(out) == {"prompt_embeds"} and out["prompt_embeds"].shape == (2, 77, CLIP_DIMS["clip_l"][0])
    _assert_same(out["prompt_embeds"], pe)
    _assert_same(enc.encode_text(["", ""])["prompt_embeds"], ne)


def test_flux_matches_pipeline(tiny):
    folder, c = tiny("flux")
    pipe = diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                  text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"], transformer=None)
    pe, pooled, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu", max_sequence_length=T5_LEN)
    out = load_family_encoder("flux", folder, t5_max_length=T5_LEN).encode_text(PROMPTS[:2])
    assert out["prompt_embeds"].shape == (2, T5_LEN, T5_DIM)
    _assert_same(out["prompt_embeds"], pe)
    _assert_same(out["pooled_prompt_embeds"], pooled)


def test_hunyuan_matches_pipeline(tiny):
    folder, c = tiny("hunyuan")
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], transformer=None,
                                          vae=None, scheduler=None, text_encoder_2=c["text_encoder_2"],
                                          tokenizer_2=c["tokenizer_2"])
    enc = load_family_encoder("hunyuan", folder, llama_max_length=LLAMA_LEN, crop_start="auto")
    assert enc.crop_start > 0
    template = {"template": HUNYUAN_PROMPT_TEMPLATE, "crop_start": enc.crop_start}
    pe, pooled, mask = pipe.encode_prompt(PROMPTS[:2], prompt_template=template, device="cpu",
                                          max_sequence_length=LLAMA_LEN)
    out = enc.encode_text(PROMPTS[:2])
    assert out["prompt_embeds"].shape == (2, LLAMA_LEN, LLAMA_DIM)
    _assert_same(out["prompt_embeds"], pe)
    _assert_same(out["prompt_attention_mask"], mask)
    _assert_same(out["pooled_prompt_embeds"], pooled)
    assert FamilyEncoder("hunyuan", c).crop_start == 95  # diffusers' default for the real tokenizer


def test_hunyuan15_matches_pipeline(tiny):
    """Qwen2.5-VL through the tokenizer's chat template around the pipeline's system message, hidden_states[-3],
    the template's tokens cropped; ByT5 on the prompt's quoted texts (zeros and no mask without quotes); the empty
    negative as the pipeline encodes it (a " " user turn): HunyuanVideo15Pipeline.encode_prompt."""
    from fastvideo_grpo.models.hunyuan_video15 import CROP_START
    from support.tiny_models import tiny_hunyuan15_vae

    folder, c = tiny("hunyuan15")
    pipe = diffusers.HunyuanVideo15Pipeline(text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], transformer=None,
                                            vae=tiny_hunyuan15_vae(), scheduler=None, text_encoder_2=c["text_encoder_2"],
                                            tokenizer_2=c["tokenizer_2"], guider=None)  # (__init__ reads the VAE)
    assert FamilyEncoder("hunyuan15", c).crop_start == pipe.prompt_template_encode_start_idx == CROP_START
    enc = load_family_encoder("hunyuan15", folder, qwen_max_length=LLAMA_LEN, t5_max_length=T5_LEN, crop_start="auto")
    pipe.prompt_template_encode_start_idx = enc.crop_start  # the tiny tokenizer's template length
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = LLAMA_LEN, T5_LEN
    from fastvideo_grpo.models.hunyuan_video15 import system_message
    rendered = c["tokenizer"].apply_chat_template([{"role": "system", "content": system_message()},
                                                   {"role": "user", "content": "cat"}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]
    assert rendered[enc.crop_start] == c["tokenizer"].convert_tokens_to_ids("cat")  # "auto": the prompt's first token
    prompts = ['a sign that reads "open" on a door', PROMPTS[1], ""]
    pe, mask, pe2, mask2 = pipe.encode_prompt(prompts, device="cpu", dtype=torch.float32, batch_size=3)
    out = enc.encode_text(prompts)
    assert out["prompt_embeds"].shape == (3, LLAMA_LEN, QWEN_VL_DIM) and enc.crop_start > 10
    assert out["glyph_embeds"].shape == (3, T5_LEN, T5_DIM)
    _assert_same(out["prompt_embeds"], pe)
    _assert_same(out["glyph_embeds"], pe2)
    _assert_same(out["prompt_attention_mask"].float(), mask)
    _assert_same(out["glyph_attention_mask"].float(), mask2)
    assert mask2[0].sum() > 0 and mask2[1:].sum() == 0 and (pe2[1:] == 0).all()  # glyph text only in the first


def test_ltx2_matches_pipeline(tiny):
    """Gemma 3's hidden states of every layer, left padding to 1024 tokens, through LTX-2's text connectors: as
    LTX2Pipeline.encode_prompt followed by its connectors (the empty negative included)."""
    from fastvideo_grpo.models.ltx2 import MAX_SEQUENCE_LENGTH
    from support.tiny_encoders import GEMMA_DIM

    folder, c = tiny("ltx2")
    pipe = diffusers.LTX2Pipeline(scheduler=None, vae=None, audio_vae=None, text_encoder=c["text_encoder"],
                                  tokenizer=c["tokenizer"], connectors=c["connectors"], transformer=None, vocoder=None)
    prompts = [" a red circle ", PROMPTS[1]]
    pe, mask, ne, nmask = pipe.encode_prompt(prompts, negative_prompt="", device="cpu")
    video, audio, conn_mask = pipe.connectors(pe, mask, padding_side="left")
    n_video, n_audio, n_mask = pipe.connectors(ne, nmask, padding_side="left")
    enc = load_family_encoder("ltx2", folder)
    out = enc.encode_text(prompts)
    assert out["prompt_embeds"].shape == (2, MAX_SEQUENCE_LENGTH, GEMMA_DIM) and mask[0, 0] == 0  # left padded
    _assert_same(out["prompt_embeds"], video)
    _assert_same(out["audio_prompt_embeds"], audio)
    _assert_same(out["prompt_attention_mask"], conn_mask)
    neg = enc.encode_text(["", ""])
    _assert_same(neg["prompt_embeds"], n_video)
    _assert_same(neg["audio_prompt_embeds"], n_audio)
    _assert_same(neg["prompt_attention_mask"], n_mask)


def test_qwen_image_matches_pipeline(tiny):
    """Template, last hidden state, template tokens dropped, zero padding: as QwenImagePipeline.encode_prompt
    (which pads to the batch's longest prompt; ours to qwen_max_length, masked)."""
    folder, c = tiny("qwen_image")
    pipe = diffusers.QwenImagePipeline(scheduler=None, vae=None, text_encoder=c["text_encoder"],
                                       tokenizer=c["tokenizer"], transformer=None)
    assert pipe.prompt_template_encode == QWEN_IMAGE_PROMPT_TEMPLATE
    assert FamilyEncoder("qwen_image", c).crop_start == pipe.prompt_template_encode_start_idx == 34
    prefix = len(c["tokenizer"](QWEN_IMAGE_PROMPT_TEMPLATE.split("{}")[0]).input_ids)
    enc = load_family_encoder("qwen_image", folder, qwen_max_length=LLAMA_LEN, crop_start="auto")
    assert enc.crop_start == prefix > 10
    pipe.prompt_template_encode_start_idx = enc.crop_start  # the tiny tokenizer's template length
    prompts = [PROMPTS[1], PROMPTS[0]]  # 6 and 3 words, + the template's suffix
    pe, mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=LLAMA_LEN)
    out = enc.encode_text(prompts)
    assert out["prompt_embeds"].shape == (2, LLAMA_LEN, QWEN_VL_DIM)
    n = pe.shape[1]
    assert n < LLAMA_LEN and mask[1].sum() < n  # the pipeline padded the shorter prompt
    _assert_same(out["prompt_embeds"][:, :n], pe)
    _assert_same(out["prompt_attention_mask"][:, :n], mask)
    assert (out["prompt_embeds"][:, n:] == 0).all() and (out["prompt_attention_mask"][:, n:] == 0).all()
    # a prompt longer than the max length keeps the pipeline's first tokens
    long = [" ".join(["cat"] * 2 * LLAMA_LEN)]
    pe_long, _ = pipe.encode_prompt(long, device="cpu", max_sequence_length=LLAMA_LEN)
    # (the pipeline runs the encoder over up to 1024 + 34 tokens, ours over max length + 34: same values up to
    # the rounding of attention over another number of keys)
    _assert_same(enc.encode_text(long)["prompt_embeds"], pe_long, exact=False)


@pytest.mark.parametrize("family", ["flux2_klein", "flux2_dev"])
def test_flux2_matches_pipeline(tiny, family):
    """FLUX.2: the chat template (klein: Qwen3's, thinking off; dev: BFL's system message, [IMG] removed),
    padded to the max length, the hidden states of three layers concatenated: as the pipelines' encode_prompt."""
    folder, c = tiny(family)
    cls = diffusers.Flux2KleinPipeline if family == "flux2_klein" else diffusers.Flux2Pipeline
    pipe = cls(scheduler=None, vae=None, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], transformer=None)
    prompts = [PROMPTS[1], "a [IMG] cat"]
    pe, _ = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=LLAMA_LEN)
    enc = load_family_encoder(family, folder, qwen_max_length=LLAMA_LEN)
    out = enc.encode_text(prompts)
    dim = 3 * (QWEN3_DIM if family == "flux2_klein" else MISTRAL3_DIM)
    assert set(out) == {"prompt_embeds"} and out["prompt_embeds"].shape == (2, LLAMA_LEN, dim)
    _assert_same(out["prompt_embeds"], pe)
    assert enc.settings()["hidden_layers"] == ([9, 18, 27] if family == "flux2_klein" else [10, 20, 30])


def test_z_image_matches_pipeline(tiny):
    """Z-Image: the chat template (thinking on), the penultimate hidden state at the valid tokens (the pipeline's
    list), stored zero-padded to the max length with the mask; the empty negative likewise."""
    folder, c = tiny("z_image")
    pipe = diffusers.ZImagePipeline(scheduler=None, vae=None, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                    transformer=None)
    prompts = [PROMPTS[0], PROMPTS[1]]
    pe, ne = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=True,
                                max_sequence_length=3 * LLAMA_LEN)
    enc = load_family_encoder("z_image", folder, qwen_max_length=3 * LLAMA_LEN)
    for got, want in ((enc.encode_text(prompts), pe), (enc.encode_text(["", ""]), ne)):
        assert got["prompt_embeds"].shape == (2, 3 * LLAMA_LEN, QWEN3_DIM)
        for i in range(2):
            m = got["prompt_attention_mask"][i].bool()
            assert int(m.sum()) == want[i].shape[0] < 3 * LLAMA_LEN
            _assert_same(got["prompt_embeds"][i][m], want[i])
            assert (got["prompt_embeds"][i][~m] == 0).all()
    assert pe[0].shape[0] != pe[1].shape[0]  # prompts of different lengths


def test_wan_matches_pipeline(tiny):
    folder, c = tiny("wan")
    pipe = diffusers.WanPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], transformer=None,
                                 vae=None, scheduler=None)
    prompts = ["a  red &amp; circle ", PROMPTS[1]]  # exercises prompt_clean
    pe, ne = pipe.encode_prompt(prompts, negative_prompt="", device="cpu", max_sequence_length=T5_LEN)
    enc = load_family_encoder("wan", folder, t5_max_length=T5_LEN)
    out = enc.encode_text(prompts)
    _assert_same(out["prompt_embeds"], pe)
    assert (out["prompt_embeds"][0, 5:] == 0).all()  # zeros after the mask
    _assert_same(enc.encode_text(["", ""])["prompt_embeds"], ne)


def test_sd3_matches_pipeline(tiny):
    folder, c = tiny("sd3")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
        text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"], text_encoder_3=c["text_encoder_3"],
        tokenizer_3=c["tokenizer_3"])
    pe, ne, pooled, npooled = pipe.encode_prompt(PROMPTS[:2], None, None, device="cpu",
                                                 do_classifier_free_guidance=True, max_sequence_length=T5_LEN)
    enc = load_family_encoder("sd3", folder, t5_max_length=T5_LEN)
    out = enc.encode_text(PROMPTS[:2])
    assert out["prompt_embeds"].shape == (2, 77 + T5_LEN, T5_DIM)
    assert out["pooled_prompt_embeds"].shape == (2, CLIP_DIMS["clip_l"][1] + CLIP_DIMS["clip_g"][1])
    _assert_same(out["prompt_embeds"], pe)
    _assert_same(out["pooled_prompt_embeds"], pooled)
    neg = enc.encode_text(["", ""])
    _assert_same(neg["prompt_embeds"], ne)
    _assert_same(neg["pooled_prompt_embeds"], npooled)


def _image(path, h, w, seed=0):
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    Image.fromarray(arr).save(path)
    return path


def test_wan_i2v_matches_pipeline(tiny, tmp_path):
    from PIL import Image

    folder, c = tiny("wan_i2v")
    H = W = 32
    F = 5
    img = _image(tmp_path / "ref.png", H, W)
    enc = load_family_encoder("wan_i2v", folder, t5_max_length=T5_LEN, height=H, width=W, num_frames=F)
    out = enc.encode_images([str(img)])
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=c["vae"], scheduler=None,
        image_processor=c["image_processor"], image_encoder=c["image_encoder"], transformer=None)
    pil = Image.open(img).convert("RGB")
    pix = pipe.video_processor.preprocess(pil, height=H, width=W).to(torch.float32)
    _, cond = pipe.prepare_latents(pix, 1, 16, H, W, F, torch.float32, torch.device("cpu"),
                                   torch.Generator().manual_seed(0))
    assert out["image_condition"].shape == (1, 4 + 16, (F - 1) // 4 + 1, H // 8, W // 8)
    _assert_same(out["image_condition"], cond)
    _assert_same(out["image_embeds"], pipe.encode_image(pil, torch.device("cpu")))


def test_wan22_5b_i2v_matches_pipeline(tiny, tmp_path):
    """TI2V-5B's first frame as WanImageToVideoPipeline.prepare_latents with expand_timesteps (the Wan 2.2 VAE:
    2 x 2 pixel patches, 16x spatial compression): one latent frame, posterior mode, normalised; the text as Wan's."""
    from PIL import Image

    folder, c = tiny("wan22_5b_i2v")
    H, W = 64, 32
    img = _image(tmp_path / "ref.png", H, W)
    enc = load_family_encoder("wan22_5b_i2v", folder, t5_max_length=T5_LEN, height=H, width=W)
    out = enc.encode(PROMPTS[:1], [str(img)])
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], vae=c["vae"],
                                             scheduler=None, image_processor=None, image_encoder=None, transformer=None,
                                             expand_timesteps=True)
    pix = pipe.video_processor.preprocess(Image.open(img).convert("RGB"), height=H, width=W).to(torch.float32)
    z = c["vae"].config.z_dim
    _, ref, _ = pipe.prepare_latents(pix, 1, z, H, W, 5, torch.float32, torch.device("cpu"), None)
    assert out["image_latents"].shape == (1, z, 1, H // 16, W // 16)
    _assert_same(out["image_latents"], ref)
    text = diffusers.WanPipeline(tokenizer=c["tokenizer"], text_encoder=c["text_encoder"], transformer=None, vae=None,
                                 scheduler=None)  # (the I2V pipeline's prompt cleaning needs ftfy, absent here)
    pe, _ = text.encode_prompt(PROMPTS[:1], negative_prompt="", device="cpu", max_sequence_length=T5_LEN)
    _assert_same(out["prompt_embeds"], pe)


def test_qwen_image_edit_matches_pipeline(tiny, tmp_path, monkeypatch):
    """Instruction + reference image through Qwen2.5-VL as QwenImageEditPipeline.encode_prompt (run with the real
    Qwen2VLProcessor: template, vision tokens expanded per merged patch, 64 template tokens dropped; the
    pipeline pads to the batch's longest, ours to qwen_max_length, masked), and the reference latent as its
    _encode_vae_image (posterior mode, normalised)."""
    from PIL import Image
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    folder, c = tiny("qwen_image_edit")
    # transformers 5 refuses to build a Qwen2VLProcessor without a video processor, which needs torchvision (not
    # installed here): only that class check is skipped; the processor's own text / image code runs
    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" and arg is None else check(self, name, arg))
    processor = Qwen2VLProcessor(image_processor=c["image_processor"], tokenizer=c["processor"], video_processor=None)
    pipe = diffusers.QwenImageEditPipeline(scheduler=None, vae=c["vae"], text_encoder=c["text_encoder"],
                                           tokenizer=c["processor"], processor=processor, transformer=None)
    assert pipe.prompt_template_encode == QWEN_IMAGE_EDIT_PROMPT_TEMPLATE
    assert FamilyEncoder("qwen_image_edit", c).crop_start == pipe.prompt_template_encode_start_idx == 64
    H = W = 32
    paths = [str(_image(tmp_path / "a.png", H, W)), str(_image(tmp_path / "b.png", H, W, seed=1))]
    enc = load_family_encoder("qwen_image_edit", folder, height=H, width=W, crop_start="auto", qwen_max_length=24)
    prefix = QWEN_IMAGE_EDIT_PROMPT_TEMPLATE.split("<|vision_start|>")[0]  # the system turn + "user\n"
    assert enc.crop_start == len(c["processor"](prefix).input_ids) > 10
    pipe.prompt_template_encode_start_idx = enc.crop_start  # the tiny tokenizer's system-turn length
    prompts = [PROMPTS[1], PROMPTS[0]]  # 6 and 3 words
    out = enc.encode(prompts, paths)
    pils = [pipe.image_processor.resize(Image.open(p).convert("RGB"), H, W) for p in paths]  # as __call__
    pe, mask = pipe.encode_prompt(prompts, image=pils, device="cpu")
    n = pe.shape[1]
    assert out["prompt_embeds"].shape == (2, 24, QWEN_VL_DIM) and n < 24 and mask[1].sum() < n
    assert n == 1 + 4 + 1 + 6 + 3  # vision start, 4 merged patches, vision end, the instruction, the suffix
    _assert_same(out["prompt_embeds"][:, :n], pe)
    _assert_same(out["prompt_attention_mask"][:, :n], mask)
    assert (out["prompt_embeds"][:, n:] == 0).all() and (out["prompt_attention_mask"][:, n:] == 0).all()
    ref = pipe._encode_vae_image(pipe.image_processor.preprocess(pils, H, W).unsqueeze(2), generator=None)
    assert out["image_latents"].shape == (2, 4, H // 2, W // 2)
    _assert_same(out["image_latents"], ref[:, :, 0], exact=False)  # equal up to float rounding (2e-7 seen)
    # the text embedding sees the image
    swapped = enc.encode(prompts, paths[::-1])["prompt_embeds"]
    assert (swapped[:, 1:5] - out["prompt_embeds"][:, 1:5]).abs().max() > 1e-4
    # user errors: too short a max length, vision tokens in an instruction, text without its image
    short = load_family_encoder("qwen_image_edit", folder, height=H, width=W, crop_start="auto", qwen_max_length=8)
    with pytest.raises(ValueError, match="4 vision tokens needs 15 embedding positions.*raise it"):
        short.encode(prompts, paths)
    with pytest.raises(ValueError, match="vision tokens"):
        enc.encode(["a <|image_pad|> cat"], paths[:1])
    with pytest.raises(ValueError, match="one reference image per prompt"):
        enc.encode(prompts, paths[:1])
    with pytest.raises(ValueError, match=r"encode\(prompts, images\)"):
        enc.encode_text(prompts)
    with pytest.raises(ValueError, match="divisible by 4"):
        load_family_encoder("qwen_image_edit", folder, height=30, width=32)


def test_qwen_image_edit_manifest_feeds_the_adapter(tiny, tmp_path):
    """Edit pairs in the released layout (instruction + source_image) -> data_prep -> manifest checked against the
    adapter's cond_spec -> collated batch -> a finite velocity; a reference size other than the adapter's is refused
    with both settings named."""
    from fastvideo_grpo.models import ADAPTERS
    from support.tiny_models import tiny_components

    folder, _ = tiny("qwen_image_edit")
    _image(tmp_path / "s0.png", 32, 48)
    _image(tmp_path / "s1.png", 32, 32, seed=1)
    pairs = _write(tmp_path / "edit.jsonl", '{"instruction": "make the cat blue", "source_image": "s0.png"}\n'
                                            '{"instruction": "add a red star", "source_image": "s1.png"}\n')
    _prep(folder, pairs, tmp_path / "out", "qwen_image_edit", "--prompt-field", "instruction", "--image-field",
          "source_image", "--height", "32", "--width", "32", "--qwen-max-length", "24")
    comps, _ = tiny_components("qwen_image_edit")
    for sub, m in comps.items():
        m.save_pretrained(str(tmp_path / "model" / sub))
    adapter = ADAPTERS.build("qwen_image_edit", model_path=str(tmp_path / "model"), resolution=16,
                             reference_resolution=32)
    validate_manifest(tmp_path / "out", adapter.cond_spec(), family="qwen_image_edit")
    ds = PromptEmbeddingDataset(tmp_path / "out")
    batch = collate_prompt_embeddings([ds[i] for i in range(len(ds))])
    z = adapter.initial_noise(2, torch.Generator().manual_seed(0))
    v = adapter.predict(z, adapter.make_schedule(3).model_timestep(0, z), batch["cond"])
    assert v.shape == z.shape and torch.isfinite(v).all()
    other = ADAPTERS.build("qwen_image_edit", model_path=str(tmp_path / "model"), resolution=16,
                           reference_resolution=16)
    with pytest.raises(ValueError, match="--height 16 --width 16"):
        other.predict(z, adapter.make_schedule(3).model_timestep(0, z), batch["cond"])


def test_hunyuan_i2v_image_latents(tiny, tmp_path):
    """Shape (C, 1, h, w) and value = VAE posterior mode x scaling factor (SkyReels pipeline samples instead)."""
    folder, c = tiny("hunyuan_i2v")
    img = _image(tmp_path / "ref.jpg", 48, 64)  # different aspect: resized to cover then center-cropped
    enc = load_family_encoder("hunyuan_i2v", folder, llama_max_length=LLAMA_LEN, crop_start="auto", height=32,
                              width=32)
    z = enc.encode_images([str(img)])["image_latents"]
    assert z.shape == (1, 4, 1, 4, 4)
    _, pix = enc.load_image(str(img))
    assert pix.shape == (3, 32, 32) and pix.min() >= -1 and pix.max() <= 1
    ref = c["vae"].encode(pix[None, :, None]).latent_dist.mode() * c["vae"].config.scaling_factor
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        enc.encode_images([str(tmp_path / "missing.png")])
    bad = _write(tmp_path / "bad.png", "not an image")
    with pytest.raises(ValueError, match="could not be read as an image"):
        enc.encode_images([str(bad)])


# ----------------------------------------------------------------------------- every family through the CLI

_EXPECTED = {
    "sd": {"prompt_embeds": (77, 16), "negative_prompt_embeds": (77, 16)},
    "flux": {"prompt_embeds": (None, T5_DIM), "pooled_prompt_embeds": (16,)},
    "hunyuan": {"prompt_embeds": (None, LLAMA_DIM), "prompt_attention_mask": (None,), "pooled_prompt_embeds": (16,)},
    "wan": {"prompt_embeds": (T5_LEN, T5_DIM), "negative_prompt_embeds": (T5_LEN, T5_DIM)},
    "sd3": {"prompt_embeds": (77 + T5_LEN, T5_DIM), "pooled_prompt_embeds": (20,),
            "negative_prompt_embeds": (77 + T5_LEN, T5_DIM), "negative_pooled_prompt_embeds": (20,)},
    "qwen_image": {"prompt_embeds": (LLAMA_LEN, QWEN_VL_DIM), "prompt_attention_mask": (LLAMA_LEN,)},
    "hunyuan_i2v": {"prompt_embeds": (LLAMA_LEN, LLAMA_DIM), "prompt_attention_mask": (LLAMA_LEN,),
                    "pooled_prompt_embeds": (16,), "negative_prompt_embeds": (LLAMA_LEN, LLAMA_DIM),
                    "image_latents": (4, 1, 4, 4)},
    "wan_i2v": {"prompt_embeds": (T5_LEN, T5_DIM), "image_condition": (20, 2, 4, 4), "image_embeds": (17, 16),
                "negative_prompt_embeds": (T5_LEN, T5_DIM)},
    "qwen_image_edit": {"prompt_embeds": (24, QWEN_VL_DIM), "prompt_attention_mask": (24,), "image_latents": (4, 16, 16)},
    "hunyuan15": {"prompt_embeds": (LLAMA_LEN, QWEN_VL_DIM), "prompt_attention_mask": (LLAMA_LEN,),
                  "glyph_embeds": (T5_LEN, T5_DIM), "glyph_attention_mask": (T5_LEN,),
                  "negative_prompt_embeds": (LLAMA_LEN, QWEN_VL_DIM), "negative_glyph_embeds": (T5_LEN, T5_DIM)},
    "ltx2": {"prompt_embeds": (1024, 16), "audio_prompt_embeds": (1024, 16), "prompt_attention_mask": (1024,),
             "negative_prompt_embeds": (1024, 16), "negative_audio_prompt_embeds": (1024, 16)},
    "wan22_5b_i2v": {"prompt_embeds": (T5_LEN, T5_DIM), "negative_prompt_embeds": (T5_LEN, T5_DIM),
                     "image_latents": (WAN22_Z, 1, 2, 2)},
    "flux2_klein": {"prompt_embeds": (LLAMA_LEN, 3 * QWEN3_DIM)},
    "flux2_dev": {"prompt_embeds": (LLAMA_LEN, 3 * MISTRAL3_DIM)},
    "z_image": {"prompt_embeds": (LLAMA_LEN, QWEN3_DIM), "prompt_attention_mask": (LLAMA_LEN,)},
}
_IMAGE_FAMILIES = ("hunyuan_i2v", "wan_i2v", "qwen_image_edit", "wan22_5b_i2v")


@pytest.mark.parametrize("family", list(_EXPECTED))
def test_cli_each_family(tiny, tmp_path, family):
    folder, _ = tiny(family)
    if family in _IMAGE_FAMILIES:
        _image(tmp_path / "a.png", 32, 32)
        _image(tmp_path / "b.png", 40, 32, seed=1)
        prompts = _write(tmp_path / "p.jsonl", '{"prompt": "a red circle", "image": "a.png"}\n'
                                               '{"prompt": "a dog", "image": "b.png"}\n'
                                               '{"prompt": "a cat", "image": "a.png"}\n')
        extra = ["--height", "32", "--width", "32"] + (["--num-frames", "5"] if family == "wan_i2v" else [])
        if family == "qwen_image_edit":
            extra += ["--qwen-max-length", "24"]
            with pytest.raises(ValueError, match="no single negative embedding"):
                _prep(folder, prompts, tmp_path / "neg", family, *extra, "--negative-prompt", "")
    else:
        prompts = _write(tmp_path / "p.txt", "\n".join(PROMPTS[:3]) + "\n")
        extra = []
    res = _prep(folder, prompts, tmp_path / "out", family, *extra)
    if family in _IMAGE_FAMILIES:
        bad = _write(tmp_path / "bad.jsonl", '{"prompt": "a", "image": "nope.png"}\n')
        with pytest.raises(FileNotFoundError, match=r"1 reference image\(s\) do not exist.*nope\.png"):
            _prep(folder, bad, tmp_path / "bad", family, *extra)
    assert res["written"] == 2 and res["skipped"] == 0
    m = validate_manifest(tmp_path / "out", _EXPECTED[family], family=family)
    assert m["header"]["dtype"] == "float32" and m["header"]["settings"]["clip_max_length"] == 77
    ds = PromptEmbeddingDataset(tmp_path / "out")
    batch = collate_prompt_embeddings([ds[i] for i in range(len(ds))])
    for name, trailing in _EXPECTED[family].items():
        t = batch["cond"][name]
        assert t.shape[0] == 3 and len(t.shape) == len(trailing) + 1
        assert all(e is None or e == s for e, s in zip(trailing, t.shape[1:])), (name, t.shape)


# ----------------------------------------------------------------------------- files: exactness, determinism, resume


@pytest.fixture
def sd_run(tiny, tmp_path):
    folder, _ = tiny("sd")
    prompts = _write(tmp_path / "p.txt", "\n".join(PROMPTS[:5]) + "\n")
    out = tmp_path / "out"
    res = _prep(folder, prompts, out)
    return folder, prompts, out, res


def test_round_trip_bit_exact(sd_run):
    folder, prompts, out, res = sd_run
    assert res == {"manifest": str(out / "manifest.json"), "written": 3, "skipped": 0}
    enc = load_family_encoder("sd", folder)
    ds = PromptEmbeddingDataset(out, verify_hashes=True)
    assert ds.prompts == PROMPTS[:5]
    for start in range(0, 5, 2):  # same encoder batches as the prep run
        ref = enc.encode_text(PROMPTS[:5][start:start + 2])["prompt_embeds"]
        for j in range(ref.shape[0]):
            got = ds[start + j]["cond"]["prompt_embeds"]
            assert got.dtype == torch.float32 and torch.equal(got, ref[j])
    neg = enc.encode_text([""])["prompt_embeds"][0]
    assert torch.equal(ds[0]["cond"]["negative_prompt_embeds"], neg)
    m = load_manifest(out)
    from fastvideo_grpo.data.manifest import hash_tensors

    assert m["records"][3]["sha256"] == hash_tensors({"prompt_embeds": ds[3]["cond"]["prompt_embeds"]})
    assert m["records"][3]["shard"] == "shards/shard-00001.safetensors" and m["records"][3]["index"] == 1
    assert m["records"][0]["tensors"]["prompt_embeds"] == {"shape": [77, 16], "dtype": "float32",
                                                          "encoder": "text_encoder"}
    assert m["header"]["encoders"]["text_encoder"]["class"] == "CLIPTextModel"


def test_bf16_storage_round_trip(tiny, tmp_path):
    folder, _ = tiny("sd")
    prompts = _write(tmp_path / "p.txt", "\n".join(PROMPTS[:2]) + "\n")
    _prep(folder, prompts, tmp_path / "out", "sd", "--dtype", "bfloat16")
    ref = load_family_encoder("sd", folder).encode_text(PROMPTS[:2])["prompt_embeds"].to(torch.bfloat16)
    ds = PromptEmbeddingDataset(tmp_path / "out")
    assert torch.equal(ds[1]["cond"]["prompt_embeds"], ref[1])
    validate_manifest(tmp_path / "out", {"prompt_embeds": {"shape": (77, 16), "dtype": torch.bfloat16}})
    with pytest.raises(ValueError, match="prompt_embeds has dtype bfloat16, expected float32"):
        validate_manifest(tmp_path / "out", {"prompt_embeds": {"dtype": "float32"}})


def test_same_run_twice_byte_identical(sd_run, tmp_path):
    folder, prompts, out, _ = sd_run
    out2 = tmp_path / "out2"
    _prep(folder, prompts, out2)
    a, b = _files(out), _files(out2)
    assert sorted(a) == sorted(b) and "manifest.json" in a and "negative.safetensors" in a
    assert all(a[k] == b[k] for k in a)


def test_resume_skips_done_and_redoes_corrupt(sd_run):
    folder, prompts, out, _ = sd_run
    before = _files(out)
    shards = sorted((out / "shards").glob("*.safetensors"))
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    res = _prep(folder, prompts, out)
    assert res["written"] == 0 and res["skipped"] == 3
    assert {p: p.stat().st_mtime_ns for p in shards} == mtimes
    # truncate shard 1: only it is redone, and the result is identical to the first run
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors.*corrupt or truncated"):
        validate_manifest(out)
    res = _prep(folder, prompts, out)
    assert res["written"] == 1 and res["skipped"] == 2
    assert shards[0].stat().st_mtime_ns == mtimes[shards[0]]
    assert _files(out) == before
    # a deleted shard is redone too
    shards[2].unlink()
    assert _prep(folder, prompts, out)["written"] == 1 and _files(out) == before
    # other settings (max length) invalidate every shard
    res = _prep(folder, prompts, out, "sd", "--clip-max-length", "20")
    assert res["written"] == 3 and load_manifest(out)["header"]["settings"]["clip_max_length"] == 20


# ----------------------------------------------------------------------------- validate_manifest


def test_validate_manifest_errors(sd_run):
    folder, prompts, out, _ = sd_run
    ok = {"prompt_embeds": {"shape": (77, None), "encoder": "CLIPTextModel", "dtype": "float32"},
          "negative_prompt_embeds": (77, 16)}
    validate_manifest(out, ok, family="sd")
    validate_manifest(out, {"prompt_embeds": {"encoder": str(folder / "text_encoder")}})
    with pytest.raises(ValueError, match="family is 'sd', expected 'flux'"):
        validate_manifest(out, family="flux")
    with pytest.raises(ValueError, match=r"prompt_embeds was encoded by .*expected encoder 'T5EncoderModel'"):
        validate_manifest(out, {"prompt_embeds": {"encoder": "T5EncoderModel"}})
    with pytest.raises(ValueError, match=r"prompt_embeds has trailing shape \(77, 16\), expected \(77, 768\)"):
        validate_manifest(out, {"prompt_embeds": (77, 768)})
    with pytest.raises(ValueError, match="pooled_prompt_embeds is missing from the records"):
        validate_manifest(out, {"pooled_prompt_embeds": (16,)})
    # a missing shard
    shard = out / "shards" / "shard-00002.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(ValueError, match=r"shard-00002\.safetensors' is missing"):
        validate_manifest(out)
    with pytest.raises(ValueError, match="is missing"):
        PromptEmbeddingDataset(out)
    # a corrupt safetensors header (same length) without hash checks
    shard.write_bytes(b"\xff" * 16 + data[16:])
    with pytest.raises(ValueError, match="unreadable safetensors header"):
        validate_manifest(out, verify_hashes=False)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        validate_manifest(out)
    shard.write_bytes(data)
    validate_manifest(out)


def test_negative_missing_and_duplicates(tiny, tmp_path):
    folder, _ = tiny("sd")
    prompts = _write(tmp_path / "p.txt", "a cat\na dog\na cat\n")
    with pytest.raises(ValueError, match=r"1 duplicated prompt\(s\) \(entries 1 and 3: 'a cat'\)"):
        _prep(folder, prompts, tmp_path / "out")
    _prep(folder, prompts, tmp_path / "keep", "sd", "--duplicates", "keep", "--no-negative")
    with pytest.raises(ValueError, match=r"duplicated prompt\(s\) \(records 0 and 2: 'a cat'\)"):
        validate_manifest(tmp_path / "keep")
    m = validate_manifest(tmp_path / "keep", dedupe=True)
    assert [r["prompt"] for r in m["records"]] == ["a cat", "a dog"] and m["_dropped_duplicates"] == 1
    assert len(PromptEmbeddingDataset(tmp_path / "keep", dedupe=True)) == 2
    with pytest.raises(ValueError, match="negative_prompt_embeds is missing from the negative conditioning"):
        validate_manifest(tmp_path / "keep", {"negative_prompt_embeds": (77, 16)}, dedupe=True)
    _prep(folder, prompts, tmp_path / "dd", "sd", "--duplicates", "dedupe")
    assert [r["prompt"] for r in load_manifest(tmp_path / "dd")["records"]] == ["a cat", "a dog"]


def test_missing_model_folder(tmp_path, tiny):
    folder, _ = tiny("sd")
    prompts = _write(tmp_path / "p.txt", "a\n")
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolders \['text_encoder_2', 'tokenizer_2'\]"):
        _prep(folder, prompts, tmp_path / "out", "flux")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        _prep(tmp_path / "nope", prompts, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="manifest .* does not exist"):
        load_manifest(tmp_path / "out")


# ----------------------------------------------------------------------------- dataset


def test_split_is_deterministic_and_disjoint(sd_run):
    _, _, out, _ = sd_run
    train = PromptEmbeddingDataset(out, split="train", eval_fraction=0.5)
    held = PromptEmbeddingDataset(out, split="eval", eval_fraction=0.5)
    assert sorted(train.prompts + held.prompts) == sorted(PROMPTS[:5])
    assert not set(train.prompts) & set(held.prompts)
    assert held.prompts == [p for p in PROMPTS[:5] if is_eval_prompt(p, 0.5)]
    assert len(PromptEmbeddingDataset(out, split="eval", eval_fraction=0.0)) == 0
    share = np.mean([is_eval_prompt(f"prompt {i}", 0.1) for i in range(4000)])
    assert 0.08 < share < 0.12
    with pytest.raises(ValueError, match="split must be one of"):
        PromptEmbeddingDataset(out, split="test")


def test_shard_cache_is_bounded(sd_run):
    import pickle

    _, _, out, _ = sd_run
    ds = PromptEmbeddingDataset(out, max_open_shards=1, include_negative=False)
    for i in range(len(ds)):
        assert set(ds[i]["cond"]) == {"prompt_embeds"}
        assert ds.num_open_shards == 1
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2.num_open_shards == 0 and torch.equal(ds2[4]["cond"]["prompt_embeds"], ds[4]["cond"]["prompt_embeds"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_prompt_embeddings)
    b = next(iter(loader))
    assert b["prompts"] == PROMPTS[:2] and b["cond"]["prompt_embeds"].shape == (2, 77, 16)


def test_collate_pads_masked_sequences():
    items = [{"prompt": "a", "index": 0, "cond": {"prompt_embeds": torch.ones(3, 4),
                                                 "prompt_attention_mask": torch.ones(3, dtype=torch.int64),
                                                 "pooled_prompt_embeds": torch.ones(2)}},
             {"prompt": "b", "index": 1, "cond": {"prompt_embeds": torch.ones(5, 4),
                                                 "prompt_attention_mask": torch.ones(5, dtype=torch.int64),
                                                 "pooled_prompt_embeds": torch.ones(2)}}]
    b = collate_prompt_embeddings(items)
    assert b["cond"]["prompt_embeds"].shape == (2, 5, 4)
    assert b["cond"]["prompt_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert b["cond"]["prompt_embeds"][0, 3:].abs().sum() == 0
    bad = [{"prompt": "a", "index": 0, "cond": {"prompt_embeds": torch.ones(3, 4)}},
           {"prompt": "b", "index": 1, "cond": {"prompt_embeds": torch.ones(5, 4)}}]
    with pytest.raises(ValueError, match="cannot batch prompt_embeds.*no attention mask"):
        collate_prompt_embeddings(bad)


# ----------------------------------------------------------------------------- with a real model adapter


def test_sd_embeddings_feed_the_adapter(tiny, tmp_path):
    """One diffusers-format folder (text encoder + UNet + VAE): prep, validate against the SD adapter's own
    cond_spec (CFG on: negatives required), and run its predict on a collated batch."""
    try:
        from fastvideo_grpo.models import ADAPTERS
    except Exception as e:  # the adapters are developed in parallel
        pytest.skip(f"model adapters not importable: {e}")
    import shutil

    folder, _ = tiny("sd")
    full = tmp_path / "sd_full"
    shutil.copytree(folder, full)
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_DIMS["clip_l"][0], attention_head_dim=8, norm_num_groups=8,
    ).save_pretrained(str(full / "unet"))
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                            layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
                            scaling_factor=0.18215).save_pretrained(str(full / "vae"))
    prompts = _write(tmp_path / "p.txt", "\n".join(PROMPTS[:3]) + "\n")
    _prep(full, prompts, tmp_path / "out")
    adapter = ADAPTERS.build("sd", model_path=str(full), resolution=16, guidance_scale=5.0)
    spec = adapter.cond_spec()
    assert set(spec) == {"prompt_embeds", "negative_prompt_embeds"}
    validate_manifest(tmp_path / "out", spec, family="sd")
    ds = PromptEmbeddingDataset(tmp_path / "out")
    batch = collate_prompt_embeddings([ds[0], ds[2]])
    z = adapter.initial_noise(2, torch.Generator().manual_seed(0), device="cpu")
    out = adapter.predict(z, torch.tensor([500, 500]), batch["cond"])
    assert out.shape == z.shape and torch.isfinite(out).all()
    no_neg = PromptEmbeddingDataset(tmp_path / "out", include_negative=False)
    with pytest.raises(ValueError, match="negative_prompt_embeds is missing"):
        adapter.predict(z, torch.tensor([500, 500]), collate_prompt_embeddings([no_neg[0], no_neg[1]])["cond"])


def test_changed_shard_bytes_are_caught_at_first_read(sd_run):
    """Bytes changed inside a shard's data (header intact, so it still opens) are refused the first time a
    process reads that shard, unless data.verify_on_read is off (then the changed values come back)."""
    _, _, out, _ = sd_run
    ds = PromptEmbeddingDataset(out, include_negative=False)
    same = [i for i in range(len(ds)) if ds.records[i]["shard"] == ds.records[0]["shard"]]
    clean = [ds[i]["cond"]["prompt_embeds"].clone() for i in same]
    shard = out / ds.records[0]["shard"]
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)  # zero the end of the tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"changed since data_prep wrote it .*verify_on_read: false"):
        PromptEmbeddingDataset(out, include_negative=False)[0]
    unchecked = PromptEmbeddingDataset(out, include_negative=False, verify_on_read=False)
    assert any(not torch.equal(unchecked[i]["cond"]["prompt_embeds"], c) for i, c in zip(same, clean))
