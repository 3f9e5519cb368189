"""No network: every way to ask for pretrained weights fails at once and says both ways out; the
weights commands of the CLI say what is true."""

import pytest

from attnzoo.cli import main
from attnzoo.errors import OfflineError


def test_nevaclip_open_clip_weights_fail_at_once_with_the_ways_out(hf_cache):
    from attnzoo.multimodal.nevaclip import NevaClip

    with pytest.raises(OfflineError) as info:
        _ = NevaClip("RN50", "openai").visual  # the Hub is unreachable (tests/conftest.py): the cache alone answers
    message = str(info.value)
    assert "cannot reach huggingface.co" in message and "RN50" in message and "openai" in message
    assert "--weights none" in message and "ATTNZOO_OFFLINE=1" in message


def test_nevaclip_in_offline_mode(hf_cache, monkeypatch):
    from attnzoo.multimodal.nevaclip import NevaClip

    monkeypatch.setenv("ATTNZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline mode.*--weights none"):
        _ = NevaClip("RN50", "openai").visual


def test_cli_weights_download_with_the_host_down(capsys, closed_port):
    assert main(["weights", "download", f"http://127.0.0.1:{closed_port}/w.pth"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach 127.0.0.1" in err and "resume" not in err
    assert "--weights none" in err and "ATTNZOO_OFFLINE=1" in err


def test_cli_models_pretrained(capsys):
    from attnzoo import list_models

    assert main(["models", "--pretrained", "resnet1*"]) == 0
    assert capsys.readouterr().out.split() == list_models("resnet1*", pretrained=True)
    assert main(["models", "resnet1*"]) == 0
    assert "resnet18" in capsys.readouterr().out.split()
