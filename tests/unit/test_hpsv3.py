"""HPSv3 on a tiny random Qwen2-VL saved in the release's layout (pre-5.0 keys + rm_head in one file).

Independent references: transformers' Qwen2VLImageProcessor for the image patches, and the release's
forward written here on the original (unconverted) model object: embeddings with the image features
scattered in, the text model called without position ids (sequential positions), one sample at a
time without padding, the head at <|Reward|>.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from fastvideo_grpo.rewards import REWARDS
from fastvideo_grpo.rewards import hpsv3 as h3
from fastvideo_grpo.rewards import video_align as va

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PROMPTS = ["a red cat", "blue dog under the green tree", "the sun"]
PIXELS = 56 * 56  # 4 x 4 patches of 14 -> 4 image tokens


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|endoftext|>", "a", "red", "cat", "blue", "dog", "under", "green", "tree", "the", "sun",
             "system", "user", "assistant", "image", "prompt"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tok


def _config(vocab, ids):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, pad_token_id=1,
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(original model, head, folder assembled by the CLI). The base config says vocab = the tokenizer's
    length; the checkpoint has 3 more embedding rows (HPSv3 resized them after adding <|Reward|>)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("hpsv3")
    base, out = root / "qwen2vl_base", str(root / "hpsv3")
    tok = _tokenizer()
    tok.save_pretrained(str(base))
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    _config(len(tok), ids).save_pretrained(str(base))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(_config(len(tok) + 3, ids)).eval()
    head = h3.ranknet_head(32).eval()
    sd = {}
    for k, v in model.state_dict().items():  # the pre-5.0 layout of the release
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        sd[k] = v.contiguous()
    sd.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    assert "visual.patch_embed.proj.weight" in sd and "model.embed_tokens.weight" in sd
    ckpt = str(root / "HPSv3.safetensors")
    save_file(sd, ckpt, metadata={"format": "pt"})
    h3.main(["--base", str(base), "--checkpoint", ckpt, "--out", out])
    return model, head, out


@pytest.fixture(scope="module")
def reward(release):
    return REWARDS.build("hpsv3", model_path=release[2], device="cpu", dtype="float32", pixels=PIXELS, batch_size=2)


def _released_forward(model, head, tok, image, prompt):
    """One sample as the release scores it (no padding, no position ids), from the original model."""
    from transformers import Qwen2VLImageProcessor

    nh, nw = va.frame_size(*image.shape[-2:], 28, PIXELS, PIXELS)
    x = F.interpolate(image[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    proc = Qwen2VLImageProcessor()(images=[x[0].permute(1, 2, 0).numpy()], do_resize=False, do_rescale=False,
                                   return_tensors="pt")
    pv, grid = proc["pixel_values"].float(), proc["image_grid_thw"]
    n_tok = int(grid.prod()) // 4
    ids = tok(h3.build_prompt(prompt, n_tok), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        feats = torch.cat(model.model.get_image_features(pv, grid).pooler_output)
        emb = emb.masked_scatter((ids == model.config.image_token_id)[..., None].expand_as(emb), feats)
        hidden = model.model.language_model(inputs_embeds=emb).last_hidden_state
        return head(hidden[ids == tok.convert_tokens_to_ids(h3.REWARD_TOKEN)].float())[0]


def test_scores_match_the_released_forward(release, reward):
    model, head, out = release
    imgs = torch.rand(3, 3, 60, 70, generator=torch.Generator().manual_seed(1))
    scores, info = reward(imgs, PROMPTS)
    tok = reward.scorer.tokenizer
    ref = torch.stack([_released_forward(model, head, tok, imgs[i], PROMPTS[i]) for i in range(3)])
    torch.testing.assert_close(scores, ref[:, 0], atol=1e-5, rtol=1e-4)       # score = mu
    torch.testing.assert_close(torch.tensor(info["sigma"]), ref[:, 1], atol=1e-5, rtol=1e-4)
    assert scores.std() > 1e-4
    # the checkpoint loaded through the old key layout holds the original weights
    loaded = reward.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_reward_token_added_and_prompt_text(reward):
    tok = reward.scorer.tokenizer
    assert tok.convert_tokens_to_ids(h3.REWARD_TOKEN) == len(_tokenizer())  # appended, as in training
    text = h3.build_prompt("a red cat", 2)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>\nYou are tasked")
    assert text.endswith("Textual prompt - a red cat\n\n\n\nPlease provide the overall ratings of this image: "
                         "<|Reward|>\n\nEND\n<|im_end|>\n<|im_start|>assistant\n")
    spaced = [ln for ln in h3.INSTRUCTION.split("\n") if ln.endswith(" ")]  # the release keeps 4 such lines
    ends = ["being the best. ", "**Visual Quality:**  ", "the lowest possible. ", "**Text Alignment:**  "]
    assert [ln[-len(e):] for ln, e in zip(spaced, ends)] == ends
    assert len(spaced) == 4 and h3.INSTRUCTION.count("{text_prompt}") == 1


def test_video_is_the_mean_of_its_frames(reward):
    v = torch.rand(2, 2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    s, _ = reward(v, PROMPTS[:2])
    per_frame, _ = reward(v.reshape(4, 3, 56, 56), [p for p in PROMPTS[:2] for _ in range(2)])
    torch.testing.assert_close(s, per_frame.view(2, 2).mean(1), atol=1e-6, rtol=0)


def test_errors(release, reward, tmp_path):
    with pytest.raises(FileNotFoundError, match="MizzenAI/HPSv3"):
        REWARDS.build("hpsv3", model_path=str(tmp_path / "nothing"))
    from safetensors.torch import save_file

    (tmp_path / "nohead").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "nohead" / name).write_bytes(open(os.path.join(release[2], name), "rb").read())
    save_file({"model.embed_tokens.weight": torch.zeros(4, 32)}, str(tmp_path / "nohead" / "model.safetensors"))
    with pytest.raises(ValueError, match="no rm_head"):
        REWARDS.build("hpsv3", model_path=str(tmp_path / "nohead"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        h3.prepare_folder(str(tmp_path), str(tmp_path / "x.safetensors"), str(tmp_path / "o"))
    x = torch.rand(2, 3, 56, 56)
    with pytest.raises(ValueError):
        reward((x * 255).to(torch.uint8), PROMPTS[:2])
    with pytest.raises(ValueError):
        reward(x, PROMPTS[:1])
