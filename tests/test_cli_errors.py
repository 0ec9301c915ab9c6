"""dalle_repro/cli/errors.py: a trainer's last line says what its run folder holds, from rank 0 only."""

from __future__ import annotations

from dalle_repro.cli.errors import print_written


def test_the_last_line_names_the_model_folder_or_says_it_is_not_there(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    print_written(tmp_path, "dvae", "dVAE tools/encode_tokens.py reads")
    assert capsys.readouterr().out.strip() == (
        f"wrote config.yaml, metrics.jsonl and checkpoints/ in {tmp_path}; no dvae/ yet "
        "(the run stopped early: --resume continues it)"
    )
    (tmp_path / "dvae").mkdir()
    (tmp_path / "dvae" / "model.safetensors").write_bytes(b"x")
    print_written(tmp_path, "dvae", "dVAE tools/encode_tokens.py reads")
    assert capsys.readouterr().out.strip().endswith(f"; the dVAE tools/encode_tokens.py reads: {tmp_path / 'dvae'}")
    monkeypatch.setenv("RANK", "1")
    print_written(tmp_path, "dvae", "dVAE tools/encode_tokens.py reads")
    assert capsys.readouterr().out == ""
