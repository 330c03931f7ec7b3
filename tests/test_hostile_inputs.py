"""Hostile repos, datasets and weights: nothing writes outside its folder, no pickle runs."""

from __future__ import annotations

import pytest
import torch
from hub_server import assert_clean_error, model_entry

from lexalign.core.errors import LexAlignError
from lexalign.core.io import safe_relative_path


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../b", "/etc/passwd", "C:\\\\evil.dll", "..\\\\up.bin", ""])
def test_unsafe_file_names_are_refused(name):
    with pytest.raises(LexAlignError, match="Unsafe file name"):
        safe_relative_path(name, "a repo")


@pytest.mark.parametrize("name", ["model.safetensors", "sub/dir/file.json", "data/train-00000-of-00001.parquet"])
def test_ordinary_names_pass(name):
    assert safe_relative_path(name, "a repo") == name


def test_a_hub_repo_listing_a_path_outside_its_folder_is_refused(tmp_path, hub, cli):  # noqa: F811
    hub.add_repo("acme/tiny", {"config.json": "{}", "../../escape.txt": "pwned"})
    rc, _, err = cli(model_entry())
    assert_clean_error(rc, err)
    assert 'Unsafe file name "../../escape.txt"' in err
    assert not list(tmp_path.parent.rglob("escape.txt"))


def test_a_local_source_with_a_link_outside_is_refused(tmp_path):
    from lexalign.config.sections import SourceConfig
    from lexalign.hub.sources import fetch

    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "secrets").symlink_to("/etc/passwd")
    with pytest.raises(LexAlignError, match="links outside"):
        fetch(SourceConfig(source="local", path=str(src)), tmp_path / "out", "model")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def pickle_only_model(tmp_path, demo_model_dir):
    """The demo model with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(demo_model_dir, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_unless_allowed(pickle_only_model):
    from lexalign.models.loading import load_causal_lm

    with pytest.raises(LexAlignError) as err:
        load_causal_lm(pickle_only_model, "cpu")
    text = err.value.render()
    assert "pickle" in text and "pytorch_model.bin" in text and "allow_pickle: true" in text
    model = load_causal_lm(pickle_only_model, "cpu", allow_pickle=True)
    assert sum(p.numel() for p in model.parameters()) > 0
