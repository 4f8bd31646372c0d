import numpy as np
import pytest

from datamodules import labels as L


def test_dataset_maps_match_design_card():
    # RAF-DB 1..7 (Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral)
    assert [L.RAFDB_TO_CANONICAL[i] for i in range(1, 8)] == [3, 4, 5, 1, 2, 6, 0]
    # FER2013 0..6 (Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral)
    assert [L.FER2013_TO_CANONICAL[i] for i in range(7)] == [6, 5, 4, 1, 2, 3, 0]
    assert [L.FERPLUS_TO_CANONICAL[c] for c in L.FERPLUS_VOTE_COLUMNS[:8]] == [0, 1, 3, 2, 6, 5, 4, 7]
    # every map is a bijection onto the 7 basic classes (contempt only in FERPlus)
    assert sorted(L.RAFDB_TO_CANONICAL.values()) == list(range(7))
    assert sorted(L.FER2013_TO_CANONICAL.values()) == list(range(7))


@pytest.mark.parametrize("name,expected", [("Happiness", 1), ("angry", 6), ("Surprised", 3), ("contempt", 7),
                                           ("neutral", 0), ("5", 5)])
def test_class_names(name, expected):
    assert L.class_name_to_id(name) == expected


def test_unknown_class_name_is_an_error():
    with pytest.raises(KeyError, match="bored"):
        L.class_name_to_id("bored")


def test_protocols():
    assert L.class_names(7)[-1] == "anger" and len(L.class_names(8)) == 8
    assert not L.in_protocol(L.CONTEMPT, 7) and L.in_protocol(L.CONTEMPT, 8)
    with pytest.raises(ValueError, match="7 or 8"):
        L.num_classes(6)


def test_au_vocabulary_vector_and_mask():
    vocab = L.AUVocabulary()
    assert len(vocab) == 12 and vocab.openface_columns()[0] == "AU01_r" and vocab.openface_columns()[-1] == "AU26_r"
    values, mask = vocab.vector({12: 3.5, 6: 0.0})
    assert values[vocab.index(12)] == 3.5
    # intensity 0 is known, absent AUs are unknown
    assert mask[vocab.index(6)] and not mask[vocab.index(1)] and mask.sum() == 2
    with pytest.raises(ValueError, match="AU12 intensity 7"):
        vocab.vector({12: 7})
    with pytest.raises(KeyError, match="AU7"):
        vocab.vector({7: 1.0})
    values, mask = vocab.vector({7: 1.0, 1: 2.0}, strict=False)
    assert mask.sum() == 1 and values[0] == 2.0


def test_custom_au_lists():
    vocab = L.parse_au_list(["AU12", 6, "au4"])
    assert vocab.aus == (12, 6, 4)
    assert L.parse_au_list(None).aus == L.DISFA_AUS
    with pytest.raises(ValueError, match="duplicates"):
        L.AUVocabulary((1, 1))
    with pytest.raises(ValueError, match="bad AU name"):
        L.parse_au_list(["smile"])
    assert vocab.describe(np.array([0.0, 2.0, 0.5])) == ["cheek raiser"]
