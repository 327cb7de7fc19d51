"""ImageReward on a tiny random checkpoint in the released key layout, built here tensor by tensor.

Independent reference: a from-scratch forward of the released architecture written in this file
(timm-style ViT with fused qkv and LayerNorm eps 1e-6; BLIP's BERT with post-norm self- and
cross-attention, padding mask, eps 1e-12; the 5-Linear MLP; the released mean/std), run on the
released-layout tensors directly. The reward maps the same tensors onto transformers' BLIP classes.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastvideo_grpo.rewards import REWARDS
from fastvideo_grpo.rewards import _clip_utils as cu
from fastvideo_grpo.rewards import blip_convert as bc

PROMPTS = ["a red cat", "a blue dog on the tree", "green tree", "the sun"]
WORDS = ["a", "red", "cat", "blue", "dog", "green", "tree", "the", "sun", "on"]
VW, TW, HW, PATCH, GRID, MAXPOS = 16, 16, 8, 8, 4, 40  # widths, head width, patch, grid, positions


def released_state_dict(seed=0, vocab=len(WORDS) + 7, layers=2):
    """A random state dict in ImageReward.pt's layout (with the extra BLIP keys it carries)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    def ln(prefix, d):
        return {f"{prefix}.weight": 1 + w(d, s=0.1), f"{prefix}.bias": w(d, s=0.1)}

    def lin(prefix, o, i):
        return {f"{prefix}.weight": w(o, i, s=1 / math.sqrt(i)), f"{prefix}.bias": w(o, s=0.1)}

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {v + "cls_token": w(1, 1, VW), v + "pos_embed": w(1, GRID * GRID + 1, VW),
          v + "patch_embed.proj.weight": w(VW, 3, PATCH, PATCH, s=0.1), v + "patch_embed.proj.bias": w(VW, s=0.1),
          **ln(v + "norm", VW)}
    for i in range(layers):
        b = f"{v}blocks.{i}."
        sd.update({**ln(b + "norm1", VW), **lin(b + "attn.qkv", 3 * VW, VW), **lin(b + "attn.proj", VW, VW),
                   **ln(b + "norm2", VW), **lin(b + "mlp.fc1", 4 * VW, VW), **lin(b + "mlp.fc2", VW, 4 * VW)})
    sd.update({t + "embeddings.word_embeddings.weight": w(vocab, TW), t + "embeddings.position_embeddings.weight":
               w(MAXPOS, TW), **ln(t + "embeddings.LayerNorm", TW),
               t + "embeddings.position_ids": torch.arange(MAXPOS).unsqueeze(0)})
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", TW), ("crossattention", VW)):
            sd.update({**lin(b + att + ".self.query", TW, TW), **lin(b + att + ".self.key", TW, kv_in),
                       **lin(b + att + ".self.value", TW, kv_in), **lin(b + att + ".output.dense", TW, TW),
                       **ln(b + att + ".output.LayerNorm", TW)})
        sd.update({**lin(b + "intermediate.dense", 3 * TW, TW), **lin(b + "output.dense", TW, 3 * TW),
                   **ln(b + "output.LayerNorm", TW)})
    dims = [TW, 1024, 128, 64, 16, 1]
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        sd.update(lin(f"mlp.layers.{idx}", o, i))
    sd.update(lin("blip.vision_proj", 8, VW))  # in the release, unused by the score
    sd.update(lin("blip.text_proj", 8, TW))
    return sd


def reference_scores(sd, pixel_values, input_ids, attention_mask):
    """The released ImageReward forward, from scratch on the released-layout tensors."""
    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(x, p):
        return x @ sd[p + ".weight"].t() + sd[p + ".bias"]

    def attend(q, k, v, heads, bias=None):
        b, n, d = q.shape
        q, k, v = (y.reshape(b, y.shape[1], heads, d // heads).transpose(1, 2) for y in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
        if bias is not None:
            s = s + bias
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixel_values, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], 1, VW), x], 1) + sd[v + "pos_embed"]
    n_blocks = len({k.split(".")[3] for k in sd if k.startswith(v + "blocks.")})
    for i in range(n_blocks):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, val, VW // HW), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    img = ln(x, v + "norm", 1e-6)

    L = input_ids.shape[1]
    h = sd[t + "embeddings.word_embeddings.weight"][input_ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # BLIP's extended mask
    n_layers = len({k.split(".")[4] for k in sd if k.startswith(t + "encoder.layer.")})
    for i in range(n_layers):
        b = f"{t}encoder.layer.{i}."
        a = attend(lin(h, b + "attention.self.query"), lin(h, b + "attention.self.key"),
                   lin(h, b + "attention.self.value"), TW // HW, pad_bias)
        h = ln(lin(a, b + "attention.output.dense") + h, b + "attention.output.LayerNorm", 1e-12)
        c = attend(lin(h, b + "crossattention.self.query"), lin(img, b + "crossattention.self.key"),
                   lin(img, b + "crossattention.self.value"), TW // HW)
        h = ln(lin(c, b + "crossattention.output.dense") + h, b + "crossattention.output.LayerNorm", 1e-12)
        f = lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense")
        h = ln(f + h, b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{idx}")
    return ((r.squeeze(-1) - bc.RELEASED_MEAN) / bc.RELEASED_STD)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertTokenizer

    d = str(tmp_path_factory.mktemp("bert_tok"))
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(os.path.join(d, "vocab.txt")).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    sd = released_state_dict()
    path = str(tmp_path_factory.mktemp("ir") / "ImageReward.pt")
    torch.save(sd, path)
    return sd, path


@pytest.fixture(scope="module")
def reward(released, bert_dir):
    return REWARDS.build("image_reward", checkpoint=released[1], tokenizer_path=bert_dir, device="cpu",
                         vision_head_width=HW, text_head_width=HW, batch_size=3)


def _tokens(bert_dir, prompts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir)
    return tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")


def test_mapped_model_scores_as_the_released_forward(released, bert_dir, reward):
    sd, _ = released
    x = torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(1))  # resized + center-cropped to 32
    scores, info = reward(x, PROMPTS)
    tok = _tokens(bert_dir, PROMPTS)
    assert tok["attention_mask"].sum(1).tolist() == [5, 8, 4, 4]  # [CLS] words [SEP], the rest padding
    px = cu.preprocess(x, GRID * PATCH, cu.OPENAI_CLIP_MEAN, cu.OPENAI_CLIP_STD)
    ref = reference_scores(sd, px, tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-4)
    assert scores.std() > 1e-3  # the tiny model does tell the samples apart
    assert info["image_reward_mean"] == pytest.approx(float(scores.mean()))


@pytest.mark.numerics
def test_each_image_is_scored_against_its_own_prompt(reward):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    s, _ = reward(x, PROMPTS)
    perm = [2, 0, 3, 1]
    s_perm, _ = reward(x[perm], [PROMPTS[i] for i in perm])
    torch.testing.assert_close(s_perm, s[perm], atol=1e-6, rtol=0)
    s_swapped, _ = reward(x, PROMPTS[::-1])
    assert not torch.allclose(s_swapped, s, atol=1e-4)  # the text does condition the score


def test_video_is_the_mean_of_its_frame_scores(reward):
    v = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    s, _ = reward(v, PROMPTS[:2])
    per_frame, _ = reward(v.reshape(6, 3, 32, 32), [p for p in PROMPTS[:2] for _ in range(3)])
    torch.testing.assert_close(s, per_frame.view(2, 3).mean(1), atol=1e-6, rtol=0)


def test_state_dict_round_trip_and_dropped_keys(released):
    sd, _ = released
    model = bc.load_imagereward_checkpoint({"state_dict": sd}, vision_head_width=HW, text_head_width=HW)
    back = bc.hf_to_imagereward_state_dict(model.state_dict())
    dropped = {k for k in sd if k.endswith("position_ids") or k.startswith(("blip.vision_proj", "blip.text_proj"))}
    assert set(back) == set(sd) - dropped
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    cfg = model.vision.config
    assert (cfg.image_size, cfg.patch_size, cfg.num_attention_heads, cfg.layer_norm_eps) == (32, 8, 2, 1e-6)
    assert model.text.config.encoder_hidden_size == VW and model.text.config.num_hidden_layers == 2


def test_bad_checkpoints_are_clear_errors(released, bert_dir, tmp_path):
    sd, _ = released
    with pytest.raises(ValueError, match="unknown ImageReward key 'logit_scale'"):
        bc.imagereward_to_hf_state_dict({**sd, "logit_scale": torch.zeros(())})
    with pytest.raises(ValueError, match="image-encoder key"):
        bc.imagereward_to_hf_state_dict({**sd, "blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(VW)})
    partial = {k: v for k, v in sd.items() if "layer.1.crossattention.self.key" not in k}
    with pytest.raises(ValueError, match="missing.*crossattention.self.key"):
        bc.load_imagereward_checkpoint(partial, vision_head_width=HW, text_head_width=HW)
    with pytest.raises(ValueError, match="lacks 'mlp.layers.0.weight'"):
        bc.load_imagereward_checkpoint({k: v for k, v in sd.items() if not k.startswith("mlp.")})
    with pytest.raises(FileNotFoundError, match="THUDM/ImageReward"):
        REWARDS.build("image_reward", checkpoint=str(tmp_path / "nope.pt"), tokenizer_path=bert_dir)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        REWARDS.build("image_reward", checkpoint=released[1], tokenizer_path=str(tmp_path))


@pytest.mark.parametrize("case", ["uint8", "shape", "mismatch", "nan"])
def test_bad_inputs_are_value_errors(reward, case):
    x, p = torch.rand(2, 3, 32, 32), PROMPTS[:2]
    if case == "uint8":
        x = (x * 255).to(torch.uint8)
    elif case == "shape":
        x = x[:, :2]
    elif case == "mismatch":
        p = PROMPTS[:3]
    else:
        x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        reward(x, p)
