from __future__ import annotations

import dataclasses

import pytest

from ghsae.config import DEFAULT_CONFIG_PATH, OBJECTIVES, PipelineConfig, config_from_dict, config_from_run, load_config
from ghsae.errors import ConfigError
from ghsae.harvest import partition


def test_embedded_pipeline_toml_equals_the_dataclass_defaults():
    assert load_config(DEFAULT_CONFIG_PATH).to_dict() == PipelineConfig().to_dict()


def test_every_config_field_has_a_docstring_in_the_source():
    import inspect

    import ghsae.config as module

    source = inspect.getsource(module)
    for section in dataclasses.fields(PipelineConfig):
        cls = type(getattr(PipelineConfig(), section.name))
        for f in dataclasses.fields(cls):
            line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{f.name}:"))
            after = source.split(line, 1)[1].lstrip()
            assert after.startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[harvest]\ntokenz = 5\n")
    with pytest.raises(ConfigError, match=r"p\.toml.*harvest\.tokenz"):
        load_config(p)


def test_unknown_section_is_an_error(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[harvst]\ntokens = 5\n")
    with pytest.raises(ConfigError, match=r"unknown section \[harvst\]"):
        load_config(p)


def test_wrong_type_names_key_file_and_expected_type(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[harvest]\ntokens = "many"\n')
    with pytest.raises(ConfigError, match=r"p\.toml: harvest\.tokens is 'many' \(str\); expected an integer"):
        load_config(p)


def test_bool_is_not_accepted_as_an_integer():
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict({"harvest": {"tokens": True}})


def test_overrides_replace_file_values_and_none_leaves_them(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[harvest]\ntokens = 1024\nseed = 3\n")
    cfg = load_config(p, {"harvest.tokens": 4096, "harvest.seed": None, "grouping.groups": 4})
    assert (cfg.harvest.tokens, cfg.harvest.seed, cfg.grouping.groups) == (4096, 3, 4)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"data": {"context_length": 1}}, "context_length"),
        ({"harvest": {"shard_tokens": 1000}}, "not a multiple of data.context_length"),
        ({"storage": {"chunk_rows": 3000}}, "does not divide"),
        ({"storage": {"dtype": "float32"}}, "storage.dtype"),
        ({"grouping": {"groups": "some"}}, "grouping.groups"),
        ({"grouping": {"groups": [[3, 1]]}}, "first <= last"),
        ({"grouping": {"layers": [4, 2]}}, "grouping.layers"),
        ({"grouping": {"amad_threshold": 1.5}}, "amad_threshold"),
        ({"model": {"device": "tpu"}}, "model.device"),
    ],
)
def test_invalid_values_are_rejected_with_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_runtime_fields_do_not_change_the_run_identity():
    a = config_from_dict({"harvest": {"batch_size": 4}, "model": {"device": "cpu"}})
    b = config_from_dict({"harvest": {"batch_size": 32}, "model": {"device": "auto"}})
    c = config_from_dict({"harvest": {"seed": 1}})
    assert a.identity_hash() == b.identity_hash() != c.identity_hash()


def test_config_objectives_match_the_partition_module():
    assert OBJECTIVES == partition.OBJECTIVES


def test_config_outlier_choices_match_the_loader():
    from ghsae.cache.loader import OUTLIER_HANDLING as LOADER
    from ghsae.config import OUTLIER_HANDLING

    assert OUTLIER_HANDLING == LOADER


def test_config_methods_and_distances_match_the_harvest_modules():
    from ghsae.config import DISTANCES, GROUPING_METHODS
    from ghsae.harvest import similarity

    assert GROUPING_METHODS == partition.METHODS
    assert set(DISTANCES) == set(similarity.DISTANCES) | set(similarity.ALIASES)
    assert all(similarity.canonical_distance(d) in similarity.DISTANCES for d in DISTANCES)


def test_a_run_made_before_the_grouping_rename_keeps_its_identity():
    # config.json of a run made on main before grouping.method existed, with the old distance name
    before = {
        "amad_threshold": 0.2,
        "distance": "centred",
        "groups": "auto",
        "layers": "all",
        "objective": "layer-mean",
    }
    cfg = config_from_run({"grouping": {"distance": "centred", "method": "dp"}})
    assert cfg.identity()["grouping"] == before
    # asking for something those runs could not do changes the identity
    other = config_from_run({"grouping": {"distance": "centred", "method": "agglomerative"}})
    assert other.identity()["grouping"] == {**before, "method": "agglomerative"}


def test_an_unknown_distance_names_the_choices():
    with pytest.raises(
        ConfigError, match="grouping.distance is 'reference'; expected one of raw, layer-centred, centred"
    ):
        config_from_dict({"grouping": {"distance": "reference"}})
