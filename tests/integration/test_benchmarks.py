"""``python -m fastvideo_grpo.cli.evaluate --suite NAME`` end to end on tiny models and tiny stand-ins of each
published prompt format.

The toy and GenEval suites run on a tiny toy-demo run and are checked against an independent computation
(the held-out evaluation's own sampler, ``distributed_evaluate``, then toy_geneval / the GenEval rules applied
here); HPDv2, DrawBench and T2I-CompBench run on a tiny FLUX with precomputed embeddings, VBench and
VideoAlign on a tiny Wan video model, with tiny CLIP / BLIP / DINO / Qwen2-VL scorers."""

import json
from pathlib import Path

import pytest
import torch

from fastvideo_grpo.cli.benchmark import main
from fastvideo_grpo.config import load_config
from support.tiny_runs import PROMPTS

ROOT = Path(__file__).resolve().parents[2]
TOY_PROMPTS = ["one red square", "two blue circles", "a red square left of a blue circle", "one green triangle"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny toy-demo run (1 GRPO iteration, exported) and its pretrained-model cache."""
    from fastvideo_grpo.cli.demo import run_demo

    root = tmp_path_factory.mktemp("toy_bench")
    cfg = load_config("configs/toy_cpu.yaml", [
        f"--train.output_dir={root / 'run'}", "--train.num_iterations=1", "--train.eval_every=0",
        "--train.num_eval_prompts=2", "--grpo.prompts_per_iteration=1", "--grpo.group_size=2",
        "--sampling.num_steps=3", "--sampling.eval_num_steps=3", "--sampling.eta_schedule=[1.0, 1.0, 0.0]",
        "--grpo.timestep_window=[0, 2]", "--eval.batch_size=8", "--rewards=[{name: toy_colour_fidelity}]",
        "--extra.pretrain.steps=60", "--extra.pretrain.num_images=256", "--extra.pretrain.batch_size=32",
        "--extra.pretrain.model={hidden: 32, depth: 1, heads: 2}",
        "--extra.pretrain.autoencoder={image_size: 32, hidden: 32, steps: 150}",
    ])
    run_demo(cfg, progress=False, cache_dir=str(root / "cache"), write_images=False)
    return root / "run", root / "cache"


def _reference_scores(run, cache, prompts, spp, batch, fns, steps=3):
    """Per-sample scores of the run's exported policy by the held-out evaluation's own code path
    (``distributed_evaluate``: its rewards see the float samples), with the run's evaluation seed."""
    from fastvideo_grpo.cli.benchmark import load_weights
    from fastvideo_grpo.cli.demo import toy_policy
    from fastvideo_grpo.training.evaluate import distributed_evaluate

    cfg = load_config(str(run / "config.yaml"))
    adapter = toy_policy(cfg, torch.device("cpu"), cache_dir=str(cache))
    load_weights(adapter, "export", run / "export", cfg)
    ev = distributed_evaluate(adapter, prompts, fns, steps, adapter.encode_prompts, samples_per_prompt=spp,
                              batch_size=batch, seed=cfg.eval.seed, dp_rank=0, dp_size=1)
    return ev["per_sample"], ev["prompts"]


def test_toy_suite_matches_toy_geneval_on_the_evaluation_samples(toy_run, tmp_path):
    from fastvideo_grpo.rewards.base import REWARDS
    from fastvideo_grpo.toy.shapes import split_prompts

    run, cache = toy_run
    out = tmp_path / "bench"
    res = main(["--suite", "toy", str(run), "--policy-args", f"{{cache_dir: {cache}}}", "--suite-args",
                "{split: held}", "--samples-per-prompt", "2", "--batch-size", "8", "--out", str(out)])
    held = split_prompts(seed=0)[1]
    geneval = REWARDS.build("toy_geneval")

    def all_correct(images, prompts):
        return geneval(images, prompts)[1]["all_correct"], {}

    ref, prompts = _reference_scores(run, cache, held, 2, 8, {"reward": geneval, "ok": all_correct})
    got = res["per_sample"]["export"]
    assert len(got) == len(held) * 2
    # the same samples (same noise per batch, same shapes in the same process) scored by the same rules
    assert [s["reward"] for s in got] == pytest.approx(ref["reward"], abs=1e-6)
    cats = [("position" if " left of " in p else "single_object" if p.startswith("one ") else "counting")
            for p in prompts]
    table = res["metrics"][0]["rows"][0]
    assert res["metrics"][0]["metric"]["key"] == "success"
    for c in set(cats):
        vals = [v for v, k in zip(ref["ok"], cats) if k == c]
        assert table["categories"][c] == {"mean": pytest.approx(sum(vals) / len(vals)), "n": len(vals)}
    assert table["overall"] == pytest.approx(sum(table["categories"][c]["mean"] for c in set(cats)) / 3)
    md = (out / "toy.md").read_text()
    assert "| model | Overall | Single object | Counting | Position |" in md and (out / "toy.json").is_file()


def test_geneval_suite_with_the_toy_detector_applies_geneval_rules(toy_run, tmp_path):
    from fastvideo_grpo.benchmarks.detection import toy_colour, toy_detections
    from fastvideo_grpo.benchmarks.geneval_rules import judge, keep_detections

    run, cache = toy_run
    meta = [{"tag": "single_object", "include": [{"class": "square", "count": 1}], "prompt": TOY_PROMPTS[0]},
            {"tag": "counting", "include": [{"class": "circle", "count": 2}],
             "exclude": [{"class": "circle", "count": 3}], "prompt": TOY_PROMPTS[1]},
            {"tag": "position", "include": [{"class": "circle", "count": 1},
                                            {"class": "square", "count": 1, "position": ["left of", 0]}],
             "prompt": TOY_PROMPTS[2]},
            {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "green"}], "prompt": TOY_PROMPTS[3]}]
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "ge"
    res = main(["--suite", "geneval", str(run / "export"), "--prompts", str(f), "--policy-args",
                f"{{cache_dir: {cache}}}", "--suite-args", "{detector: {name: toy}}", "--batch-size", "8",
                "--out", str(out), "--save-images"])

    def correct(images, prompts):
        flags = []
        for i, img in enumerate(images):
            m = next(x for x in meta if x["prompt"] == prompts[i])
            flags.append(float(judge(keep_detections(toy_detections(img), m["tag"]), m, toy_colour, img)[0]))
        return torch.tensor(flags), {}

    ref, _ = _reference_scores(run, cache, TOY_PROMPTS, 4, 8, {"correct": correct})
    assert [s["correct"] for s in res["per_sample"]["export"]] == ref["correct"]
    assert (out / "images" / "export" / "00002" / "samples" / "0003.png").is_file()
    assert json.loads((out / "images" / "export" / "00002" / "metadata.jsonl").read_text())["tag"] == "position"
    assert "| model | Overall | Single object | Counting | Colors | Position |" in (out / "geneval.md").read_text()


def _flux_args(tiny, recipe="configs/flux_hps.yaml", family="flux"):
    folder, kw, manifest = tiny(family)
    args = ["base", "--config", str(ROOT / recipe), "--embeddings", str(manifest), f"--model.kwargs.model_path={folder}",
            "--sampling.eval_num_steps=2", "--train.device=cpu", "--train.autocast=none"]
    args += [f"--model.kwargs.{k}={json.dumps(v)}" for k, v in kw.items()]
    return args, manifest


def test_hpdv2_and_drawbench_on_a_tiny_flux_with_embeddings(tiny, tmp_path):
    import support.tiny_runs  # noqa: F401  (registers test_brightness)

    args, manifest = _flux_args(tiny)
    bench = tmp_path / "hpdv2"
    bench.mkdir()
    for i, s in enumerate(("anime", "concept-art", "paintings", "photo")):
        (bench / f"{s}.json").write_text(json.dumps(PROMPTS[i * 3:(i + 1) * 3]))
    res = main(["--suite", "hpdv2", "--prompts", str(bench), "--suite-args", "{reward: {name: test_brightness}}",
                "--out", str(tmp_path / "o1")] + args)
    vals = [s["test_brightness"] for s in res["per_sample"]["base"]]
    row = res["metrics"][0]["rows"][0]
    assert row["categories"]["photo"]["mean"] == pytest.approx(sum(vals[9:12]) / 3, rel=1e-6)
    assert row["overall"] == pytest.approx(sum(vals) / 12, rel=1e-6)  # equal styles: mean of means = mean
    md = (tmp_path / "o1" / "hpdv2.md").read_text()
    assert "| model | Overall | Animation | Concept-art | Painting | Photo |" in md and "(x100)" in md
    csv = tmp_path / "drawbench.csv"
    csv.write_text("Prompts,Category\n" + "".join(f"{p},{'Colors' if i % 2 else 'Counting'}\n"
                                                  for i, p in enumerate(PROMPTS[:4])))
    res = main(["--suite", "drawbench", "--prompts", str(csv), "--suite-args", "{rewards: [{name: test_brightness}]}",
                "--samples-per-prompt", "2", "--batch-size", "4", "--out", str(tmp_path / "o2")] + args)
    assert len(res["per_sample"]["base"]) == 8 and res["metrics"][0]["rows"][0]["categories"]["Colors"]["n"] == 4
    # a prompt the embeddings do not hold, and writing the prompts for data_prep
    csv.write_text("Prompts,Category\nan unseen prompt,Colors\n")
    with pytest.raises(ValueError, match="write them with --write-prompts"):
        main(["--suite", "drawbench", "--prompts", str(csv), "--suite-args", "{rewards: [{name: test_brightness}]}",
              "--out", str(tmp_path / "o3")] + args)
    main(["--suite", "drawbench", "--prompts", str(csv), "--write-prompts", str(tmp_path / "p.txt")] + args)
    assert (tmp_path / "p.txt").read_text() == "an unseen prompt\n"


def test_t2i_compbench_on_a_tiny_flux(tiny, tmp_path):
    from support.tiny_benchmarks import blip_vqa_dir, clip_dir

    args, _ = _flux_args(tiny)
    d = tmp_path / "dataset"
    d.mkdir()
    (d / "color_val.txt").write_text(f"{PROMPTS[0]}\n{PROMPTS[1]}\n")
    (d / "spatial_val.txt").write_text(f"{PROMPTS[2]}\n")
    (d / "non_spatial_val.txt").write_text(f"{PROMPTS[3]}\n")
    (d / "complex_val.txt").write_text(f"{PROMPTS[4]}\n")
    blip, clip = blip_vqa_dir(tmp_path / "blip"), clip_dir(tmp_path / "clip")
    res = main(["--suite", "t2i_compbench", "--prompts", str(d), "--samples-per-prompt", "2", "--batch-size", "4",
                "--suite-args", f"{{blip_vqa_path: {blip}, clip_path: {clip}, detector: {{name: toy}}}}",
                "--out", str(tmp_path / "o")] + args)
    row = res["metrics"][0]["rows"][0]
    assert [c for c in res["categories"]] == ["color", "spatial", "non_spatial", "complex"]
    assert row["overall"] is None and row["categories"]["color"]["n"] == 4
    per = res["per_sample"]["base"]
    cats = [c for c in ("color", "color", "spatial", "non_spatial", "complex") for _ in range(2)]
    assert all((-1.0 if c in ("non_spatial", "complex") else 0.0) <= s["score"] <= 1.0 for s, c in zip(per, cats))
    assert "| model | Color | Spatial | Non-spatial | Complex |" in (tmp_path / "o" / "t2i_compbench.md").read_text()


def test_vbench_and_videoalign_on_a_tiny_video_model(tiny, tmp_path):
    from fastvideo_grpo.benchmarks.vbench import temporal_flickering
    from support.tiny_benchmarks import clip_dir, dino_dir, video_align_dir

    args, _ = _flux_args(tiny, "configs/wan_t2v.yaml", "wan")
    info = [{"prompt_en": PROMPTS[0], "dimension": ["subject_consistency", "temporal_flickering"]},
            {"prompt_en": PROMPTS[1], "dimension": ["background_consistency"]}]
    f = tmp_path / "VBench_full_info.json"
    f.write_text(json.dumps(info))
    dino, clip = dino_dir(tmp_path / "dino"), clip_dir(tmp_path / "clip")
    res = main(["--suite", "vbench", "--prompts", str(f), "--samples-per-prompt", "2", "--batch-size", "2",
                "--suite-args", f"{{dimensions: [subject_consistency, background_consistency, temporal_flickering], "
                                f"dino_path: {dino}, clip_path: {clip}}}", "--out", str(tmp_path / "o")] + args)
    per = res["per_sample"]["base"]
    assert len(per) == 6 and all(0.0 <= s["score"] <= 1.0 for s in per)
    # temporal flickering recomputed here on the same videos: item 1 (the first prompt's second dimension) is the
    # suite's batch 1 (1 prompt x 2 samples per batch), sampled from noise seed eval.seed + 1
    from fastvideo_grpo.benchmarks.base import build_policy
    from fastvideo_grpo.training.evaluate import evaluate_policy

    cfg = load_config(str(ROOT / "configs/wan_t2v.yaml"), [a for a in args if a.startswith("--model.")])
    _, _, manifest = tiny("wan")
    from fastvideo_grpo.data.dataset import PromptEmbeddingDataset
    from fastvideo_grpo.data.embedding_lookup import EmbeddingLookup

    adapter = build_policy(cfg, torch.device("cpu"))
    encode = EmbeddingLookup([PromptEmbeddingDataset(manifest, split="all")], "cpu")
    ev = evaluate_policy(adapter, [PROMPTS[0]], {}, 2, encode=encode, samples_per_prompt=2, seed=cfg.eval.seed + 1,
                         batch_size=2, return_images=True)
    assert [per[2]["score"], per[3]["score"]] == pytest.approx([temporal_flickering(v) for v in ev["images"]], abs=1e-6)
    md = (tmp_path / "o" / "vbench.md").read_text()
    assert "| model | Subject consistency | Background consistency | Temporal flickering |" in md
    txt = tmp_path / "prompts.txt"
    txt.write_text(f"{PROMPTS[0]}\n{PROMPTS[5]}\n")
    va = video_align_dir(tmp_path / "va")
    res = main(["--suite", "videoalign", "--prompts", str(txt), "--batch-size", "2", "--suite-args",
                f"{{reward_kwargs: {{model_path: {va}, dtype: float32, video_fps: 4, sample_fps: 2, "
                f"max_pixels: 3136, min_pixels: 784}}}}", "--out", str(tmp_path / "o2")] + args)
    s = res["per_sample"]["base"][0]
    assert s["overall"] == pytest.approx(s["VQ"] + s["MQ"] + s["TA"], rel=1e-6)
    assert [m["metric"]["key"] for m in res["metrics"]] == ["VQ", "MQ", "TA", "overall"]


def test_suite_errors_name_what_to_fix(toy_run, tmp_path):
    run, cache = toy_run
    with pytest.raises(ValueError, match="needs --prompts"):
        main(["--suite", "geneval", str(run)])
    with pytest.raises(ValueError, match="does not take"):
        main(["--suite", "toy", str(run), "--suite-args", "{colour: red}"])
    with pytest.raises(ValueError, match="--policy-args must be a YAML mapping"):
        main(["--suite", "toy", str(run), "--policy-args", "[1]"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--suite", "geneval", str(run), "--prompts", str(tmp_path / "missing.jsonl")])
