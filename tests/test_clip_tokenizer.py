import pytest

from lightning_modules.generator.clip_tokenizer import offline_clip_tokenizer, write_clip_vocab


def test_ids_equal_open_clip(tmp_path):
    import open_clip

    ours = offline_clip_tokenizer(tmp_path / "tok")
    assert ours("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    reference = open_clip.get_tokenizer("ViT-B-32")
    for text in ["a close-up photo of a person with short dark hair, smiling, cheeks raised",
                 "Brows LOWERED; lips pressed!", "contempt: one lip corner up"]:
        ref = [t for t in reference([text])[0].tolist() if t != 0]
        assert ours(text)["input_ids"] == ref, text
    padded = ours(["a face"], padding="max_length", max_length=77, truncation=True)["input_ids"][0]
    assert len(padded) == 77 and padded[-1] == 49407


def test_second_build_reads_the_cache_without_rebuilding(tmp_path, monkeypatch):
    import open_clip

    from lightning_modules.generator import clip_tokenizer

    first = offline_clip_tokenizer(tmp_path / "tok")
    files = [tmp_path / "tok" / name for name in ("vocab.json", "merges.txt")]
    stamps = [f.stat().st_mtime_ns for f in files]
    builds = []
    monkeypatch.setattr(clip_tokenizer, "write_clip_vocab", lambda *a, **k: builds.append(a))
    cached = offline_clip_tokenizer(tmp_path / "tok")
    assert builds == [] and [f.stat().st_mtime_ns for f in files] == stamps
    text = "a close-up photo of a person, brows raised"
    assert cached(text)["input_ids"] == first(text)["input_ids"] == \
        [t for t in open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist() if t != 0]
    # a half-written cache (merges.txt lost) is rebuilt, not read
    files[1].unlink()
    monkeypatch.undo()
    rebuilt = offline_clip_tokenizer(tmp_path / "tok")
    assert files[1].is_file() and rebuilt(text)["input_ids"] == first(text)["input_ids"]


def test_missing_bpe_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        write_clip_vocab(tmp_path, bpe_path=str(tmp_path / "nope.txt.gz"))
