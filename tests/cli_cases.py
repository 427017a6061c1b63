"""What the command-line tests share (imported by test_cli_engine*.py): a tiny model
folder with a tokenizer, and running `kvsqueeze` in process."""

from __future__ import annotations

import pytest

from kvsqueeze.cli import main
from kvsqueeze.hf.tiny import byte_tokenizer, tiny_model


def saved_model(tmp_path_factory, name: str, **options) -> str:
    """A tiny Llama (`options` go to tiny_model) saved with a byte tokenizer; its path."""
    model = tiny_model("llama", max_positions=512, seed=2, **options)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `kvsqueeze argv`."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err
