from pathlib import Path

import pytest

from hfmerge.errors import ModelReferenceError
from hfmerge.refs import parse_model_ref


def test_hub_reference_without_revision():
    ref = parse_model_ref("google/flan-t5-base")
    assert (ref.repo_id, ref.revision, ref.path) == ("google/flan-t5-base", None, None)
    assert not ref.is_local


def test_hub_reference_with_revision():
    ref = parse_model_ref("tanganke/flan-t5-base_glue-rte@v1.0")
    assert (ref.repo_id, ref.revision) == ("tanganke/flan-t5-base_glue-rte", "v1.0")


def test_existing_folder_is_local(tmp_path: Path):
    (tmp_path / "org" / "name").mkdir(parents=True)
    ref = parse_model_ref("org/name", base_dir=tmp_path)
    assert ref.is_local and ref.path == (tmp_path / "org" / "name").resolve()


def test_explicit_path_kept_even_if_missing(tmp_path: Path):
    ref = parse_model_ref("./missing", base_dir=tmp_path)
    assert ref.is_local and ref.path == (tmp_path / "missing").absolute()


@pytest.mark.parametrize("bad", ["", "a/b/c@", "org/na me", "org/name@", "-bad/name", "org//name"])
def test_bad_references_name_the_field(bad):
    with pytest.raises(ModelReferenceError, match="models\\[0\\].model"):
        parse_model_ref(bad, field="models[0].model")
