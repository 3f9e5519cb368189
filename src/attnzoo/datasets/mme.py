"""MME (Fu et al. 2023), the released ``MME_Benchmark_release_version`` folder: 14 subtasks of yes / no
questions, two per image (one answered yes, one no). The hallucination-relevant perception subset is
existence, count, position and color (multimodal notes §2.3).

Layout (``--data`` is the release folder or its parent)::

    MME_Benchmark_release_version/
      existence/000000006040.jpg          image and questions side by side (existence, count,
      existence/000000006040.txt          position, color, OCR and the cognition subtasks)
      artwork/images/10002.jpg            or in two folders (artwork, celebrity, landmark,
      artwork/questions_answers_YES_NO/10002.txt    posters, scene)

Each ``.txt`` holds the image's questions, one ``question<TAB>answer`` line each (answer Yes / No);
the released questions end in " Please answer yes or no.".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from attnzoo._io import read_text
from attnzoo.errors import DatasetFormatError, InvalidOptionError

__all__ = ["MME_HALLUCINATION_SUBTASKS", "MME_SUBTASKS", "MmeQuestion", "find_mme_root", "read_mme"]

MME_HALLUCINATION_SUBTASKS = ("existence", "count", "position", "color")
MME_SUBTASKS = (
    *MME_HALLUCINATION_SUBTASKS,
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)
RELEASE_FOLDER = "MME_Benchmark_release_version"
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@dataclass(frozen=True)
class MmeQuestion:
    subtask: str
    image: Path
    index: int
    """0 or 1: the question's line in the image's file."""
    question: str
    answer: str
    """``"yes"`` or ``"no"``."""

    @property
    def image_key(self) -> str:
        return self.image.name


def find_mme_root(root: str | os.PathLike) -> Path:
    """The release folder: ``root`` itself or its ``MME_Benchmark_release_version``."""
    root = Path(root)
    for candidate in (root, root / RELEASE_FOLDER):
        if candidate.is_dir() and any((candidate / s).is_dir() for s in MME_SUBTASKS):
            return candidate
    raise DatasetFormatError(f"{root} is not MME's release folder (no subtask folder such as {root / 'existence'})")


def _subtask_folders(folder: Path) -> tuple[Path, Path]:
    if (folder / "images").is_dir() or (folder / "questions_answers_YES_NO").is_dir():
        images, questions = folder / "images", folder / "questions_answers_YES_NO"
        for part in (images, questions):
            if not part.is_dir():
                raise DatasetFormatError(f"MME subtask {folder.name}: folder {part} is missing")
        return images, questions
    return folder, folder


def read_mme(root: str | os.PathLike, subtasks: Sequence[str] = MME_HALLUCINATION_SUBTASKS) -> list[MmeQuestion]:
    """The questions of ``subtasks``, by subtask, image name and line; each image's two questions and
    its image file are checked up front."""
    unknown = [s for s in subtasks if s not in MME_SUBTASKS]
    if unknown or not subtasks:
        raise InvalidOptionError(f"MME subtasks are {', '.join(MME_SUBTASKS)}; got {', '.join(unknown) or 'none'}")
    release = find_mme_root(root)
    questions: list[MmeQuestion] = []
    for subtask in subtasks:
        folder = release / subtask
        if not folder.is_dir():
            raise DatasetFormatError(f"MME subtask folder {folder} is missing")
        image_dir, question_dir = _subtask_folders(folder)
        files = sorted(question_dir.glob("*.txt"))
        if not files:
            raise DatasetFormatError(f"MME subtask {subtask}: no question files (*.txt) in {question_dir}")
        for path in files:
            image = next(
                (image_dir / f"{path.stem}{s}" for s in _IMAGE_SUFFIXES if (image_dir / f"{path.stem}{s}").is_file()),
                None,
            )
            if image is None:
                raise DatasetFormatError(f"{path}: its image {path.stem}.jpg/.png is missing from {image_dir}")
            lines = [
                line
                for line in read_text(path, "MME questions (question<TAB>Yes/No lines)").splitlines()
                if line.strip()
            ]
            if len(lines) != 2:
                raise DatasetFormatError(f"{path}: expected 2 question lines (one per answer), found {len(lines)}")
            for index, line in enumerate(lines):
                question, sep, answer = line.strip().rpartition("\t")
                answer = answer.strip().lower()
                if not sep or not question.strip() or answer not in ("yes", "no"):
                    raise DatasetFormatError(
                        f"{path}, line {index + 1}: expected 'question<TAB>Yes' or '<TAB>No', got {line!r}"
                    )
                questions.append(MmeQuestion(subtask, image, index, question.strip(), answer))
    return questions
