"""The benchmark suites' pure parts against hand-computed references: GenEval's scoring rules on synthetic
detections (thresholds, counting, colours, positions, two objects, colour attribution), T2I-CompBench's spatial
rule, mmdet's output conversion, the toy detector on rendered shapes, VBench's per-video formulas, the tables'
aggregation (HPDv2's 10 chunks, GenEval's mean over tasks) and the published prompt formats on tiny stand-ins."""

import json
import math
import random

import pytest
import torch

from fastvideo_grpo.benchmarks import SUITES
from fastvideo_grpo.benchmarks.base import Metric
from fastvideo_grpo.benchmarks.detection import Detection, detections_from_mmdet, toy_detections
from fastvideo_grpo.benchmarks.geneval_rules import compute_iou, judge, keep_detections, relative_position
from fastvideo_grpo.benchmarks.tables import build_payload, chunk_std, markdown, summarize
from fastvideo_grpo.benchmarks.t2i_compbench import determine_position, spatial_objects, spatial_score
from fastvideo_grpo.benchmarks.vbench import consistency, temporal_flickering


def D(x1, y1, x2, y2, s=0.95):
    return Detection((x1, y1, x2, y2), s)


# ------------------------------------------------------------------ GenEval


def test_iou_counts_inclusive_pixels_and_relative_position_follows_geneval():
    assert compute_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 5x10 of 10x10 + 10x10 - 50
    assert compute_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
    # A (centre 10, 50) left of B (centre 90, 50); boxes 20 wide: offset -80, shrunk by 0.1 * 40 -> -76
    a, b = (0, 40, 20, 60), (80, 40, 100, 60)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position((40, 0, 60, 20), (40, 80, 60, 100)) == {"above"}
    # diagonal at 45 degrees: each shrunk share is (60 - 4) / 84.85 = 0.66 > 0.5 on both axes
    assert relative_position((0, 0, 20, 20), (60, 60, 80, 80)) == {"left of", "above"}
    # centres closer than 0.1 x the summed sizes on both axes: no relation
    assert relative_position((0, 0, 100, 100), (5, 5, 105, 105)) == set()
    # mostly vertical offset: dx share below 0.5 -> only "below"
    assert relative_position((40, 80, 60, 100), (30, 0, 50, 20)) == {"below"}


def test_keep_detections_thresholds_counting_limit_and_nms():
    raw = {"cat": [D(0, 0, 9, 9, 0.5), D(50, 50, 59, 59, 0.95), D(1, 1, 10, 10, 0.31), D(0, 0, 1, 1, 0.3)],
           "dog": [D(0, 0, 5, 5, 0.2)]}
    kept = keep_detections(raw, "two_object")
    assert [d.score for d in kept["cat"]] == [0.95, 0.5, 0.31] and "dog" not in kept  # > 0.3, most confident first
    assert [d.score for d in keep_detections(raw, "counting")["cat"]] == [0.95]  # counting: > 0.9
    assert len(keep_detections(raw, "colors", max_objects=2)["cat"]) == 2
    # NMS at 0.5: (1,1,10,10) overlaps (0,0,9,9) with IoU 81 / 119 = 0.68 -> removed
    assert [d.score for d in keep_detections(raw, "colors", nms_threshold=0.5)["cat"]] == [0.95, 0.5]


def _colours(mapping):
    """A colour classifier returning fixed colours per detection box."""
    return lambda image, dets, name: [mapping[tuple(d.box)] for d in dets]


def test_geneval_tasks_pass_and_fail_as_the_published_rules_say():
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert judge({"cat": [D(0, 0, 9, 9)]}, single)[0]
    assert not judge({"dog": [D(0, 0, 9, 9)]}, single)[0]
    two = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert judge({"cat": [D(0, 0, 9, 9)], "dog": [D(20, 0, 29, 9)]}, two)[0]
    ok, why = judge({"cat": [D(0, 0, 9, 9)]}, two)
    assert not ok and why == ["expected dog>=1, found 0"]
    count = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    cats = [D(i * 20, 0, i * 20 + 9, 9) for i in range(3)]
    assert judge({"cat": cats[:2]}, count)[0]
    assert not judge({"cat": cats}, count)[0] and not judge({"cat": cats[:1]}, count)[0]  # 3 excluded, 1 too few
    colour = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    car = D(0, 0, 9, 9)
    assert judge({"car": [car]}, colour, _colours({car.box: "red"}))[0]
    assert not judge({"car": [car]}, colour, _colours({car.box: "blue"}))[0]
    with pytest.raises(ValueError, match="colour classifier"):
        judge({"car": [car]}, colour)
    # position: "a cat left of a dog" -> include dog, then cat with position ["left of", 0]
    pos = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    cat_left, dog_right = D(0, 40, 20, 60), D(80, 40, 100, 60)
    assert judge({"cat": [cat_left], "dog": [dog_right]}, pos)[0]
    ok, why = judge({"cat": [dog_right], "dog": [cat_left]}, pos)
    assert not ok and why == ["expected cat left of target, found right of target"]
    ok, why = judge({"cat": [cat_left]}, pos)  # no dog: the position clause has no target
    assert not ok and why[-1] == "no target for cat to be left of"
    # colour attribution: each object its own colour; swapped colours fail
    attr = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bus", "count": 1, "color": "blue"}]}
    bus = D(30, 0, 39, 9)
    objs = {"car": [car], "bus": [bus]}
    assert judge(objs, attr, _colours({car.box: "red", bus.box: "blue"}))[0]
    assert not judge(objs, attr, _colours({car.box: "blue", bus.box: "red"}))[0]
    # only the `count` most confident objects are checked for the colour (the list is already sorted)
    two_cars = {"car": [car, D(50, 0, 59, 9)]}
    assert judge(two_cars, colour, _colours({car.box: "red", (50, 0, 59, 9): "blue"}))[0]


def test_mmdet_results_convert_to_detections_per_class():
    import numpy as np

    bbox = [np.array([[1, 2, 11, 12, 0.9], [3, 4, 5, 6, 0.2]], dtype=np.float32), np.zeros((0, 5), np.float32)]
    masks = [[np.ones((4, 4), bool), np.zeros((4, 4), bool)], []]
    out = detections_from_mmdet((bbox, masks), ["cat", "dog"])
    assert list(out) == ["cat"] and [d.box for d in out["cat"]] == [(1, 2, 11, 12), (3, 4, 5, 6)]
    assert out["cat"][0].score == pytest.approx(0.9) and out["cat"][0].mask.dtype == torch.bool
    assert detections_from_mmdet(bbox, ["cat", "dog"])["cat"][1].mask is None  # bbox-only result


def test_toy_detector_finds_the_rendered_shapes():
    from fastvideo_grpo.toy.shapes import parse_prompt, render

    img = render(parse_prompt("a red square left of a blue circle"), 32, random.Random(3))
    dets = toy_detections(img)
    assert sorted(dets) == ["circle", "square"] and len(dets["square"]) == len(dets["circle"]) == 1
    sq, ci = dets["square"][0], dets["circle"][0]
    assert "left of" in relative_position(sq.box, ci.box)
    from fastvideo_grpo.benchmarks.detection import toy_colour

    assert toy_colour(img, [sq, ci], "x") == ["red", "blue"]
    x0, y0, x1, y1 = sq.box
    assert int(sq.mask.sum()) == (x1 - x0 + 1) * (y1 - y0 + 1)  # a square fills its box


# ------------------------------------------------------------------ T2I-CompBench


def test_t2i_compbench_spatial_rule():
    # object 1 at x 0..20, object 2 at x 80..100 (same rows): 2 is right of 1 -> "on the left of" holds for 1
    b1, b2 = (0, 40, 20, 60), (80, 40, 100, 60)
    assert determine_position("on the left of", b1, b2) == 1.0 and determine_position("on the right of", b1, b2) == 0
    assert determine_position("on the right of", b2, b1) == 1.0
    # overlapping boxes: IoU 1/3 >= 0.1 -> 0.1 / IoU
    o1, o2 = (0, 0, 20, 20), (10, 0, 30, 20)
    assert determine_position("on the left of", o1, o2) == pytest.approx(0.1 / (200 / 600))
    assert determine_position("on the top of", (0, 0, 10, 10), (0, 100, 10, 110)) == 1.0
    assert determine_position("near", (0, 0, 10, 10), (400, 400, 410, 410)) == pytest.approx(150 / 400)
    assert determine_position("on top of", b1, b2) == 0.0  # in the vocabulary, scored 0 by the released rule
    assert spatial_objects("a girl on the left of a car") == ("on the left of", "person", "car")
    dets = {"person": [D(0, 40, 20, 60, 0.8), D(0, 0, 1, 1, 0.1)], "car": [D(80, 40, 100, 60, 0.6)]}
    assert spatial_score("a girl on the left of a car", dets) == pytest.approx(0.25 * 0.8 + 0.25 * 0.6 + 0.5)
    assert spatial_score("a girl on the right of a car", dets) == 0.0  # 0.35 < 0.5 -> 0
    assert spatial_score("a girl on the left of a car", {"car": dets["car"]}) == 0.0  # 0.15 < 0.5


def test_noun_phrases_fallback_splits_attribute_prompts():
    from fastvideo_grpo.benchmarks.blip_vqa import noun_phrases

    try:
        import spacy  # noqa: F401
        pytest.skip("spaCy installed: its noun chunks are used")
    except ImportError:
        pass
    assert noun_phrases("a green bench and a red car.") == ["a green bench", "a red car"]
    assert noun_phrases("a blue bowl, a round clock and a wooden table") == ["a blue bowl", "a round clock",
                                                                             "a wooden table"]


# ------------------------------------------------------------------ VBench


def test_vbench_consistency_and_flickering_formulas():
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=-1)
    ref = 0.0
    for i in range(1, 5):
        ref += (max(0.0, float(f[i] @ f[i - 1])) + max(0.0, float(f[i] @ f[0]))) / 2
    assert consistency(f) == pytest.approx(ref / 4, rel=1e-12)
    assert consistency(f[:1]) == 1.0
    video = torch.zeros(3, 3, 4, 4)
    video[1] = 1.0  # frame 0 -> 1: |diff| 255 everywhere; 1 -> 2: 255 again
    assert temporal_flickering(video) == pytest.approx(0.0)
    video[2] = 1.0
    assert temporal_flickering(video) == pytest.approx((255 - 127.5) / 255)
    assert temporal_flickering(torch.full((4, 3, 2, 2), 0.3)) == 1.0


# ------------------------------------------------------------------ tables


def test_chunk_std_is_hpsv2s_std_of_ten_chunk_means():
    vals = [float(i % 7) for i in range(800)]
    means = [sum(vals[c * 80:(c + 1) * 80]) / 80 for c in range(10)]
    m = sum(means) / 10
    assert chunk_std(vals, 10) == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in means) / 10), rel=1e-12)
    assert chunk_std([1.0, 2.0], 10) is None
    assert chunk_std([1.0, 2.0, 3.0], 2) == pytest.approx(0.75)  # chunks [1, 2] and [3]: means 1.5, 3


def test_summarize_overall_by_categories_samples_or_none():
    vals = [1.0, 0.0, 1.0, 1.0, None, 0.0]
    cats = ["a", "a", "a", "b", "b", "c"]
    s = summarize(Metric("m", "m"), vals, cats, ["a", "b", "c"])
    assert s["categories"]["a"] == {"mean": pytest.approx(2 / 3), "n": 3} and s["categories"]["b"]["n"] == 1
    assert s["overall"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # GenEval: the mean of the task means
    assert summarize(Metric("m", "m", overall="samples"), vals, cats, ["a", "b", "c"])["overall"] == pytest.approx(3 / 5)
    assert summarize(Metric("m", "m", overall="none"), vals, cats, ["a", "b", "c"])["overall"] is None


# ------------------------------------------------------------------ prompt formats (tiny stand-ins)


def _suite(name, prompts, **args):
    return SUITES.get(name)(str(prompts) if prompts else None, args, None)


def test_geneval_metadata_jsonl(tmp_path):
    f = tmp_path / "evaluation_metadata.jsonl"
    lines = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
             {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
              "prompt": "a photo of two dogs"}]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    items = _suite("geneval", tmp_path).items()  # the folder works too
    assert [(i.prompt, i.category) for i in items] == [("a photo of a cat", "single_object"),
                                                       ("a photo of two dogs", "counting")]
    assert items[1].meta["exclude"][0]["count"] == 3
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="line 1 lacks"):
        _suite("geneval", f).items()
    suite = _suite("geneval", tmp_path)
    with pytest.raises(ValueError, match="needs --suite-args detector"):
        suite.scorer(torch.device("cpu"))


def test_hpdv2_benchmark_folder_and_mapping(tmp_path):
    for s in ("anime", "concept-art", "paintings", "photo"):
        (tmp_path / f"{s}.json").write_text(json.dumps([f"{s} prompt {i}" for i in range(3)]))
    items = _suite("hpdv2", tmp_path, reward={"name": "hps", "kwargs": {"model_path": "x"}}).items()
    assert len(items) == 12 and items[0].category == "anime" and items[-1].prompt == "photo prompt 2"
    one = tmp_path / "all.json"
    one.write_text(json.dumps({"photo": ["p1"], "anime": ["a1"]}))
    assert [i.category for i in _suite("hpdv2", one, styles=["photo", "anime"]).items()] == ["photo", "anime"]
    with pytest.raises(ValueError, match="not HPDv2 styles"):
        _suite("hpdv2", tmp_path, styles=["cartoon"]).items()
    with pytest.raises(ValueError, match="does not take"):
        _suite("hpdv2", tmp_path, colour="red")


def test_drawbench_csv(tmp_path):
    f = tmp_path / "drawbench.csv"
    f.write_text('Prompts,Category\nA red colored car.,Colors\n"A cat, sitting.",DALL-E\n,Colors\n')
    items = _suite("drawbench", f, rewards=[{"name": "clip_score"}]).items()
    assert [(i.prompt, i.category) for i in items] == [("A red colored car.", "Colors"), ("A cat, sitting.", "DALL-E")]
    f.write_text("text,kind\na,b\n")
    with pytest.raises(ValueError, match="prompt column"):
        _suite("drawbench", f).items()


def test_t2i_compbench_category_files(tmp_path):
    (tmp_path / "color_val.txt").write_text("a green bench and a red car\n\na blue bowl and a yellow cup\n")
    (tmp_path / "spatial_val.txt").write_text("a cat on the left of a dog\n")
    (tmp_path / "complex_val.txt").write_text("The red car is parked on the left of the house.\n")
    (tmp_path / "complex_val_spatial.txt").write_text("The red car is parked on the left of the house.\n")
    suite = _suite("t2i_compbench", tmp_path)
    items = suite.items()
    assert [i.category for i in items] == ["color", "color", "spatial", "complex"]
    assert suite.complex_kind == {"the red car is parked on the left of the house": "spatial"}
    with pytest.raises(FileNotFoundError, match="_val.txt"):
        _suite("t2i_compbench", tmp_path, categories=["texture"]).items()


def test_vbench_full_info_and_per_dimension_folder(tmp_path):
    info = [{"prompt_en": "a dog running", "dimension": ["subject_consistency", "dynamic_degree"]},
            {"prompt_en": "a beach", "dimension": ["background_consistency", "temporal_flickering"]}]
    f = tmp_path / "VBench_full_info.json"
    f.write_text(json.dumps(info))
    items = _suite("vbench", f).items()
    assert [(i.prompt, i.category) for i in items] == [("a dog running", "subject_consistency"),
                                                       ("a beach", "background_consistency"),
                                                       ("a beach", "temporal_flickering")]
    d = tmp_path / "per_dim"
    d.mkdir()
    (d / "temporal_flickering.txt").write_text("a still lake\n")
    assert [i.category for i in _suite("vbench", d).items()] == ["temporal_flickering"]
    with pytest.raises(ValueError, match="not run here"):
        _suite("vbench", f, dimensions=["motion_smoothness"]).items()


def test_videoalign_prompt_files(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a dog\na cat\n")
    assert [(i.prompt, i.category) for i in _suite("videoalign", f).items()] == [("a dog", "all"), ("a cat", "all")]


def test_markdown_tables_in_the_papers_layout(tmp_path):
    from fastvideo_grpo.benchmarks.base import Item

    suite = _suite("toy", None)
    items = [Item("one red square", "single_object"), Item("two red squares", "counting")]
    rows = [{"name": "base", "checkpoint": "base", "per_sample": [{"success": 1.0}, {"success": 0.0}] * 1},
            {"name": "export", "checkpoint": "x", "per_sample": [{"success": 1.0}, {"success": 1.0}]}]
    payload = build_payload(suite, items, [Metric("success", "correct images")], rows,
                            {"samples_per_prompt": 1, "num_prompts": 2, "num_steps": 3, "seed": 0})
    md = markdown(payload)
    assert "| model | Overall | Single object | Counting |" in md
    assert "| base | 0.5000 | 1.0000 | 0.0000 |" in md and "| export | 1.0000 | 1.0000 | 1.0000 |" in md
    from fastvideo_grpo.benchmarks.tables import write_tables

    paths = write_tables(tmp_path, payload)
    assert json.loads(open(paths["json"]).read())["metrics"][0]["rows"][1]["overall"] == 1.0
    assert not list(tmp_path.glob(".*.tmp"))
