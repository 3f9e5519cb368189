"""MME's released folder: images beside their question files (existence, count, position, color) or
in images/ + questions_answers_YES_NO/ (artwork etc.), two "question<TAB>Yes/No" lines per image."""

import pytest

from attnzoo.datasets.mme import MME_HALLUCINATION_SUBTASKS, find_mme_root, read_mme
from attnzoo.errors import DatasetFormatError, InvalidOptionError

SUFFIX = " Please answer yes or no."


def write_mme_tree(root, images=2):
    """MME_Benchmark_release_version/<subtask>/<image>.jpg + .txt for the perception subset, and one
    subtask in the two-folder layout."""
    release = root / "MME_Benchmark_release_version"
    for subtask in MME_HALLUCINATION_SUBTASKS:
        folder = release / subtask
        folder.mkdir(parents=True)
        for i in range(images):
            stem = f"{i:012d}"
            (folder / f"{stem}.jpg").write_bytes(b"jpeg")
            (folder / f"{stem}.txt").write_text(
                f"Is there a dog in this image?{SUFFIX}\tYes\nIs there a {subtask} {i} in this image?{SUFFIX}\tNo\n"
            )
    art = release / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YES_NO").mkdir()
    (art / "images" / "10002.jpg").write_bytes(b"jpeg")
    (art / "questions_answers_YES_NO" / "10002.txt").write_text(
        f"Is this by Monet?{SUFFIX}\tNo\r\nIs this a painting?{SUFFIX}\tYes\r\n"
    )
    return root


def test_reads_the_perception_subset(tmp_path):
    write_mme_tree(tmp_path)
    questions = read_mme(tmp_path)
    assert len(questions) == 16 and [q.subtask for q in questions[::4]] == list(MME_HALLUCINATION_SUBTASKS)
    first = questions[0]
    assert (first.index, first.answer, first.image.name) == (0, "yes", "000000000000.jpg")
    assert first.question.endswith(SUFFIX.strip())
    art = read_mme(tmp_path / "MME_Benchmark_release_version", ["artwork"])
    assert [(q.answer, q.image_key) for q in art] == [("no", "10002.jpg"), ("yes", "10002.jpg")]
    assert find_mme_root(tmp_path).name == "MME_Benchmark_release_version"


@pytest.mark.parametrize(
    "content, message",
    [
        ("Q1?\tYes\n", "expected 2 question lines"),
        ("Q1?\tYes\nQ2?\tMaybe\n", "line 2: expected 'question<TAB>Yes'"),
        ("Q1? Yes\nQ2?\tNo\n", "line 1"),
    ],
)
def test_malformed_question_files(tmp_path, content, message):
    write_mme_tree(tmp_path)
    path = tmp_path / "MME_Benchmark_release_version" / "count" / "000000000001.txt"
    path.write_text(content)
    with pytest.raises(DatasetFormatError, match=message) as err:
        read_mme(tmp_path)
    assert "000000000001.txt" in str(err.value)


def test_missing_parts(tmp_path):
    with pytest.raises(DatasetFormatError, match="not MME's release folder"):
        read_mme(tmp_path)
    write_mme_tree(tmp_path)
    (tmp_path / "MME_Benchmark_release_version" / "color" / "000000000000.jpg").unlink()
    with pytest.raises(DatasetFormatError, match="its image 000000000000.jpg/.png is missing"):
        read_mme(tmp_path)
    with pytest.raises(DatasetFormatError, match="subtask folder .*OCR is missing"):
        read_mme(tmp_path, ["OCR"])
    with pytest.raises(InvalidOptionError, match="MME subtasks are"):
        read_mme(tmp_path, ["colour"])
    (tmp_path / "MME_Benchmark_release_version" / "artwork" / "images").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetFormatError, match="artwork/images is missing"):
        read_mme(tmp_path, ["artwork"])
