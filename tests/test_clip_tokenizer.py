import pytest

from lightning_modules.clip_tokenizer import offline_clip_tokenizer, write_clip_vocab


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
    # cached: a second build reads the files written the first time
    assert offline_clip_tokenizer(tmp_path / "tok").vocab_size == ours.vocab_size == 49408


def test_missing_bpe_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        write_clip_vocab(tmp_path, bpe_path=str(tmp_path / "nope.txt.gz"))
