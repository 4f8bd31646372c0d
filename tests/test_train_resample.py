"""data.train_resample_size: real train faces shrunk first, so a student sees them with a smaller face's detail
(the resolution diagnosis: 32 px generator faces reach 48 px students upsampled)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from datamodules.real import RealFERDataModule
from datamodules.transforms import AugmentConfig, eval_transform, train_transform

NO_AUGMENT = dict(hflip=False, crop_scale=(1.0, 1.0), rotation_deg=0, color_jitter=0, random_erasing=0)


def _face(size=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_resampled_train_face_is_the_small_face_upsampled():
    face = _face()
    got = train_transform(48, AugmentConfig(**NO_AUGMENT), resample_size=16)(face)
    small = v2.Resize((16, 16), antialias=True)(face)
    assert torch.allclose(got, eval_transform(48)(small), atol=1e-6)
    full = train_transform(48, AugmentConfig(**NO_AUGMENT))(face)
    assert torch.allclose(full, eval_transform(48)(face), atol=1e-6)
    assert (got - full).abs().mean() > 0.05  # the detail above 16 px is gone


def _toy(**kw):
    dm = RealFERDataModule(format="toy", image_size=32, batch_size=4, augment=NO_AUGMENT,
                           toy={"n_train": 6, "n_val": 4, "n_test": 4, "image_size": 32, "seed": 1}, **kw)
    dm.setup()
    return dm


def test_only_the_train_split_is_resampled():
    plain, shrunk = _toy(), _toy(train_resample_size=12)
    assert not torch.allclose(plain.datasets["train"][0]["image"], shrunk.datasets["train"][0]["image"])
    for split in ("val", "test"):
        assert torch.equal(plain.datasets[split][0]["image"], shrunk.datasets[split][0]["image"])


def test_a_mixed_students_real_faces_are_resampled_its_synthetic_ones_not(tmp_path):
    from datamodules.mix import MixedFERDataModule
    from synthetic_fixtures import write_toy_synthetic_set

    write_toy_synthetic_set(tmp_path / "set", n=12)

    def train_items(**kw):
        dm = MixedFERDataModule(_toy(**kw), synthetic=str(tmp_path / "set"), mode="concat", scale=1.0,
                                synthetic_augment=NO_AUGMENT)
        dm.setup("fit")
        return [dm.train_dataset[i]["image"] for i in range(len(dm.train_dataset))]

    plain, shrunk = train_items(), train_items(train_resample_size=12)
    num_real = 6  # real faces come first in the union
    assert len(plain) == 2 * num_real
    assert all(not torch.allclose(a, b) for a, b in zip(plain[:num_real], shrunk[:num_real]))
    assert all(torch.equal(a, b) for a, b in zip(plain[num_real:], shrunk[num_real:]))


@pytest.mark.parametrize("bad", [4, 2000, "32", True, 16.5])
def test_bad_resample_size_names_the_key(bad):
    with pytest.raises(ValueError, match="data.train_resample_size"):
        RealFERDataModule(format="toy", train_resample_size=bad)


def test_resampling_a_public_format_download_without_sidecars(tmp_path):
    """An ImageFolder / FER2013 export with no OpenFace or caption files: the knob needs nothing but the faces."""
    from datamodules.toyfaces import ToyFacesConfig
    from datamodules.toyfaces_export import export_toyfaces

    export = export_toyfaces(ToyFacesConfig(image_size=48, seed=2), {"train": 8, "val": 4, "test": 4}, tmp_path)
    for fmt, protocol in (("imagefolder", 8), ("fer2013", 7)):
        def dm(**kw):
            module = RealFERDataModule(format=fmt, root=str(export[fmt]), protocol=protocol, image_size=32,
                                       batch_size=4, augment=NO_AUGMENT, **kw)
            module.setup()
            return module

        plain, shrunk = dm(), dm(train_resample_size=12)
        assert plain.au_source == "none" and not plain.datasets["train"][0]["au_mask"].any()
        assert not torch.allclose(plain.datasets["train"][0]["image"], shrunk.datasets["train"][0]["image"])
        assert torch.equal(plain.datasets["test"][0]["image"], shrunk.datasets["test"][0]["image"])
