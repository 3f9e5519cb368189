"""POPE: the published question files (JSON lines, per source and split) read from the AGLA / VCD
layout, and question files built from a synthetic COCO instances file with POPE's sampling rules."""

import json
from collections import Counter

import pytest

from attnzoo.datasets.pope import (
    POPE_SOURCES,
    POPE_SPLITS,
    PopeDataset,
    PopeQuestion,
    build_pope_questions,
    coco_image_objects,
    find_pope_file,
    read_pope_questions,
    write_pope_questions,
)
from attnzoo.errors import DatasetFormatError, InvalidOptionError

OBJECTS = ["dog", "cat", "person", "apple", "car", "umbrella", "bench", "bird"]


def write_pope_tree(root, images=3, per_image=2):
    """AGLA's ``data/`` layout: POPE/<source>/<source>_pope_<split>.json, val2014/ and gqa/images/."""
    for folder in (root / "val2014", root / "gqa" / "images"):
        folder.mkdir(parents=True, exist_ok=True)
    for source in POPE_SOURCES:
        for split in POPE_SPLITS:
            lines, qid = [], 1
            for i in range(images):
                name = f"{i + 100}.jpg" if source == "gqa" else f"COCO_val2014_{i:012d}.jpg"
                folder = root / "gqa" / "images" if source == "gqa" else root / "val2014"
                (folder / name).write_bytes(b"not decoded by the reader")
                for k in range(per_image):
                    for label, obj in (("yes", OBJECTS[(i + k) % 8]), ("no", OBJECTS[(i + k + 4) % 8])):
                        text = f"Is there a {obj} in the image?"
                        lines.append(json.dumps({"question_id": qid, "image": name, "text": text, "label": label}))
                        qid += 1
            path = root / "POPE" / source / f"{source}_pope_{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
    return root


def test_reads_every_source_and_split(tmp_path):
    write_pope_tree(tmp_path)
    for source in POPE_SOURCES:
        for split in POPE_SPLITS:
            ds = PopeDataset.from_root(tmp_path, source, split)
            assert len(ds.questions) == 12 and ds.split == split
            assert Counter(q.label for q in ds.questions) == {"yes": 6, "no": 6}
            assert ds.image_path(ds.questions[0]).is_file()
            assert ds.image_folder.name == ("images" if source == "gqa" else "val2014")


def test_other_published_layouts(tmp_path):
    q = {"question_id": 1, "image": "x.jpg", "text": "Is there a dog in the image?", "label": "yes"}
    (tmp_path / "pope_coco").mkdir()  # OPERA
    (tmp_path / "pope_coco" / "coco_pope_random.json").write_text(json.dumps(q) + "\n")
    assert find_pope_file(tmp_path, "coco", "random").parent.name == "pope_coco"
    seem = tmp_path / "output" / "seem" / "gqa"  # POPE's own, a JSON array
    seem.mkdir(parents=True)
    (seem / "gqa_pope_seem_popular.json").write_text(json.dumps([q, {**q, "question_id": 2, "label": "no"}], indent=4))
    questions = read_pope_questions(find_pope_file(tmp_path, "gqa", "popular"))
    assert [x.label for x in questions] == ["yes", "no"]
    assert find_pope_file(tmp_path / "pope_coco" / "coco_pope_random.json", "coco", "random").is_file()


def test_a_question_file_given_by_path_is_labelled_by_its_name(tmp_path):
    write_pope_tree(tmp_path)
    path = tmp_path / "POPE" / "gqa" / "gqa_pope_popular.json"
    ds = PopeDataset.from_root(path)
    assert (ds.source, ds.split, ds.image_folder.name) == ("gqa", "popular", "images")
    assert (PopeDataset.from_root(tmp_path).source, PopeDataset.from_root(tmp_path).split) == ("coco", "adversarial")
    with pytest.raises(InvalidOptionError, match="--split random contradicts .*gqa_pope_popular.json"):
        PopeDataset.from_root(tmp_path, split="random", questions=path)
    with pytest.raises(InvalidOptionError, match="--source coco contradicts"):
        find_pope_file(path, "coco", "popular")
    plain = tmp_path / "questions.json"
    plain.write_text(path.read_text())
    with pytest.raises(InvalidOptionError, match="does not say its source and split"):
        PopeDataset.from_root(tmp_path, questions=plain)
    assert PopeDataset.from_root(tmp_path, "gqa", "random", questions=plain).split == "random"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question_id": 1, "image": "a.jpg", "text": "t", "label": "yes"}\n{oops\n', "line 2: not valid JSON"),
        ('{"question_id": 1, "image": "a.jpg", "text": "t", "label": "maybe"}\n', "label must be yes or no"),
        ('{"question_id": "1", "image": "a.jpg", "text": "t", "label": "no"}\n', "'question_id' missing"),
        ('{"question_id": 1, "image": "a.jpg", "label": "no"}\n', "'text' missing"),
        (
            '{"question_id": 1, "image": "a.jpg", "text": "t", "label": "no"}\n{"question_id": 2, "image": "a.jpg", '
            '"text": "", "label": "no"}\n',
            "line 2: 'text' .*is blank",
        ),
        ('{"question_id": 1, "image": "a.jpg", "text": " \\n ", "label": "yes"}\n', "line 1: 'text' .*is blank"),
        ('{"question_id": 1, "image": "a.jpg", "text": "t", "label": "no"}\n' * 2, "appears twice"),
        ("[1, 2]", "expected a JSON object"),
        ("\n\n", "holds no records"),
    ],
)
def test_malformed_question_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "coco_pope_random.json"
    path.write_text(content)
    with pytest.raises(DatasetFormatError, match=message) as err:
        read_pope_questions(path)
    assert "coco_pope_random.json" in str(err.value)


def test_missing_files_and_images(tmp_path):
    with pytest.raises(DatasetFormatError, match="no POPE question file coco_pope_random.json"):
        PopeDataset.from_root(tmp_path, "coco", "random")
    write_pope_tree(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    with pytest.raises(DatasetFormatError, match="1 images of coco_pope_random.json are missing"):
        PopeDataset.from_root(tmp_path, "coco", "random")
    with pytest.raises(InvalidOptionError, match="split"):
        PopeDataset.from_root(tmp_path, "coco", "hard")
    with pytest.raises(InvalidOptionError, match="source"):
        PopeDataset.from_root(tmp_path, "vqa", "random")


# -- building questions from COCO annotations -------------------------------------------------------
def synthetic_instances():
    """12 images with known objects (ids 1..12); image 12 has one object only (never eligible)."""
    names = ["person", "dog", "cat", "car", "bus", "apple", "orange", "umbrella", "kite"]
    contents = [
        ["person", "dog", "car"],
        ["person", "dog", "cat"],
        ["person", "car", "bus"],
        ["dog", "cat", "person", "kite"],
        ["apple", "orange", "person"],
        ["car", "bus", "person", "umbrella"],
        ["dog", "person", "umbrella"],
        ["cat", "dog", "apple"],
        ["person", "kite", "umbrella"],
        ["bus", "car", "dog"],
        ["orange", "apple", "cat"],
        ["person"],
    ]
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    images = [{"id": i + 1, "file_name": f"COCO_val2014_{i + 1:012d}.jpg"} for i in range(len(contents))]
    annotations = []
    for i, objs in enumerate(contents):
        for obj in objs + objs[:1]:  # a second box of the first object: listed once
            annotations.append({"image_id": i + 1, "category_id": names.index(obj) + 1})
    return {"images": images, "annotations": annotations, "categories": categories}, contents


def test_coco_image_objects_keep_first_box_order_once():
    instances, contents = synthetic_instances()
    pairs = coco_image_objects(instances)
    assert [objs for _, objs in pairs] == contents
    with pytest.raises(DatasetFormatError, match="not a COCO instances file"):
        coco_image_objects({"images": []})


def test_pope_sampling_rules_hold():
    instances, _ = synthetic_instances()
    pairs = coco_image_objects(instances)
    built = build_pope_questions(pairs, seed=3, images=8, per_image=3)
    drawn = list(dict.fromkeys(q.image for q in built["random"]))
    assert len(drawn) == 8
    objects = dict(pairs)
    # independent counts over the drawn images
    frequency = Counter(o for name in drawn for o in objects[name])
    together = {o: Counter() for o in frequency}
    for name in drawn:
        for o in objects[name]:
            together[o].update(x for x in objects[name] if x != o)
    for split, questions in built.items():
        assert [q.question_id for q in questions] == list(range(1, len(questions) + 1))
        assert Counter(q.label for q in questions) == {"yes": 24, "no": 24}  # balanced
        assert list(dict.fromkeys(q.image for q in questions)) == drawn  # the same images in every split
        for name in drawn:
            mine = [q for q in questions if q.image == name]
            asked = [q.text.split(" in the image")[0].split()[-1] for q in mine]
            assert [q.label for q in mine] == ["yes", "no"] * 3  # each present object followed by an absent one
            assert asked[0::2] == objects[name][:3]  # the first three objects of the image's list
            absent = asked[1::2]
            assert len(set(absent)) == 3 and not set(absent) & set(objects[name])
            for k, neg in enumerate(absent):
                excluded = set(objects[name]) | set(asked[: 2 * k + 1])
                if split == "popular":  # the most frequent object not excluded
                    best = max(c for o, c in frequency.items() if o not in excluded)
                    assert frequency[neg] == best
                if split == "adversarial":  # the object most often seen with the asked one
                    seen_with = together[asked[2 * k]]
                    candidates = {o: c for o, c in seen_with.items() if o not in excluded}
                    if candidates:
                        assert seen_with[neg] == max(candidates.values())


def test_pope_building_is_seeded_and_round_trips(tmp_path):
    pairs = coco_image_objects(synthetic_instances()[0])
    a = build_pope_questions(pairs, seed=1, images=6, per_image=2)
    assert a == build_pope_questions(pairs, seed=1, images=6, per_image=2)
    assert a["random"] != build_pope_questions(pairs, seed=2, images=6, per_image=2)["random"]
    assert a["popular"] == build_pope_questions(pairs, seed=1, images=6, per_image=2, splits=["popular"])["popular"]
    path = write_pope_questions(tmp_path / "coco" / "coco_pope_random.json", a["random"])
    assert read_pope_questions(path) == a["random"]
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["question_id", "image", "text", "label"]
    assert find_pope_file(tmp_path, "coco", "random") == path


def test_pope_articles_and_errors():
    pairs = [("a.jpg", ["apple", "umbrella", "dog"]), ("b.jpg", ["orange", "car", "elephant"])]
    built = build_pope_questions(pairs, seed=0, images=2, per_image=3, splits=["random"])
    texts = {q.text for q in built["random"]}
    assert "Is there an apple in the image?" in texts and "Is there a dog in the image?" in texts
    assert all("imange" not in t for t in texts)
    with pytest.raises(DatasetFormatError, match="only 2 images have at least 3 objects"):
        build_pope_questions(pairs, images=3)
    with pytest.raises(DatasetFormatError, match="no object left"):
        build_pope_questions([("a.jpg", ["dog", "cat"])], images=1, per_image=2)
    with pytest.raises(InvalidOptionError, match="split"):
        build_pope_questions(pairs, images=1, splits=["hard"])
    assert PopeQuestion(1, "a.jpg", "t", "yes").label == "yes"
