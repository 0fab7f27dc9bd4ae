"""An adapter that ships a tokenizer replaces the base's tokenizer files as a set.

Adapters saved after adding tokens (`<tool>`, resized vocabulary) carry tokenizer.json / tokenizer_config.json but
usually no SentencePiece tokenizer.model. Overlaying them file by file left the base's tokenizer.model beside the
new tokenizer.json; llama.cpp's converter reads tokenizer.model first and got the old vocabulary.
"""

from __future__ import annotations

import json

import helpers_tiny as ht
import oracle
import pytest


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    base = ht.make_base(root / "base")
    oracle.save_tokenizer(base)
    # the base's SentencePiece model and legacy files (content does not matter: they must not reach the output)
    (base / "tokenizer.model").write_bytes(b"\x0a\x07<unk>stale sentencepiece model")
    (base / "added_tokens.json").write_text('{"[PAD2000]": 2000}')
    adapter = ht.make_adapter(root / "adapter", base)
    return root, base, adapter


def test_adapter_tokenizer_replaces_the_base_tokenizer_as_a_set(pair, tmp_path, capsys):
    from transformers import AutoTokenizer

    _root, base, adapter = pair
    ad = tmp_path / "adapter"
    ad.mkdir()
    for f in adapter.iterdir():
        (ad / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens(["<tool>"], special_tokens=True)
    tok.save_pretrained(str(ad))
    shipped = {p.name for p in ad.iterdir() if not p.name.startswith("adapter_")}
    assert "tokenizer.json" in shipped and "tokenizer.model" not in shipped

    out = tmp_path / "out"
    code, _, err = ht.run_cli(["--base", base, "--adapter", ad, "--output", out], capsys)
    assert code == 0, err
    assert not (out / "tokenizer.model").exists()  # the stale SentencePiece model is gone
    assert not (out / "added_tokens.json").exists()
    for name in shipped:
        assert (out / name).read_bytes() == (ad / name).read_bytes(), name
    # the base's other files are still there
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    merged_tok = AutoTokenizer.from_pretrained(str(out))
    assert merged_tok.convert_tokens_to_ids("<tool>") == len(tok) - 1
    assert merged_tok.tokenize("<tool>") == ["<tool>"]


def test_a_stray_template_alone_is_overlaid(pair, tmp_path, capsys):
    """An adapter with only a chat template (no tokenizer) keeps the base's tokenizer and adds the template."""
    _root, base, adapter = pair
    ad = tmp_path / "adapter"
    ad.mkdir()
    for f in adapter.iterdir():
        (ad / f.name).write_bytes(f.read_bytes())
    (ad / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "out"
    code, _, err = ht.run_cli(["--base", base, "--adapter", ad, "--output", out], capsys)
    assert code == 0, err
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "added_tokens.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name


def test_chat_template_kept_unless_the_adapter_brings_one(pair, tmp_path, capsys):
    """The template is not vocabulary: a base chat_template.jinja stays when the adapter's tokenizer has none,
    and goes when the adapter's tokenizer_config.json carries its own (the base file would override it)."""
    _root, base, adapter = pair
    base2 = tmp_path / "base"
    base2.mkdir()
    for f in base.iterdir():
        (base2 / f.name).write_bytes(f.read_bytes())
    (base2 / "chat_template.jinja").write_text("{{ base template }}")
    for with_template in (False, True):
        ad = tmp_path / f"adapter-{with_template}"
        ad.mkdir()
        for f in adapter.iterdir():
            (ad / f.name).write_bytes(f.read_bytes())
        oracle.save_tokenizer(ad, extra="x")
        if with_template:
            cfg = json.loads((ad / "tokenizer_config.json").read_text())
            cfg["chat_template"] = "{{ adapter template }}"
            (ad / "tokenizer_config.json").write_text(json.dumps(cfg))
        out = tmp_path / f"out-{with_template}"
        code, _, err = ht.run_cli(["--base", base2, "--adapter", ad, "--output", out], capsys)
        assert code == 0, err
        assert (out / "chat_template.jinja").exists() is not with_template
        assert not (out / "tokenizer.model").exists()
