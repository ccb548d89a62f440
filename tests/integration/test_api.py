"""The public Python API: the README's example runs as written (on a tiny fitted run), and an SAE's
public methods speak raw units."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

import ghsae

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


def test_the_readme_example_runs_on_a_fitted_run(fitted_run):
    code = readme_example()
    assert 'ghsae.open_run("runs/default")' in code and "layer = 14" in code
    # the tiny run has 6 layers; its group_01 serves 3-5
    code = code.replace('"runs/default"', repr(str(fitted_run))).replace("layer = 14", "layer = 4")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    m = re.fullmatch(r"layer 4: (\d+) active latents, FVU ([0-9.]+)\n", out.getvalue())
    assert m, out.getvalue()
    assert int(m.group(1)) <= 4  # the tiny run's k
    assert 0.0 < float(m.group(2)) < 1.0  # in raw units, better than predicting the mean


def test_decode_of_encode_is_a_reconstruction_in_the_layers_raw_units(fitted_run):
    run = ghsae.open_run(fitted_run)
    sae = run.sae_for_layer(4)
    scale, mean = sae.norm_scale[1], sae.norm_mean[1]
    assert not torch.isclose(scale, torch.tensor(1.0)), "the layer must be scaled for the test to mean anything"
    x = torch.randn(64, sae.cfg.d_model) / scale + mean
    z = sae.encode(x, 4)
    torch.testing.assert_close(sae.decode(z, 4), sae.reconstruct(x, 4))
    # decode_normalised is the SAE's own space: the layer's scale apart from the raw reconstruction
    torch.testing.assert_close(sae.decode_normalised(z) / scale + mean, sae.decode(z, 4))
    with pytest.raises(TypeError):
        sae.decode(z)  # the layer is required: no call can silently mix the two spaces


def test_a_run_opens_with_typed_records_and_its_own_settings(fitted_run, small_cfg):
    run = ghsae.open_run(fitted_run)
    assert run.plan.groups == ((0, 1, 2), (3, 4, 5))
    assert run.plan.group_of_layer(4) == "group_01"
    assert run.shard_record(0).groups["group_00"].rows > 0
    assert run.sae_record("group_00").layers == [0, 1, 2]
    assert run.settings().fit == small_cfg.fit  # recorded by fit in saes/fit.json
    assert run.info().saes_missing == []
    assert ghsae.train.load_sae is ghsae.load_sae  # the name the fit issue asked for
    with pytest.raises(ghsae.errors.ConfigError, match="group_07 is not in"):
        run.sae("group_07")


def test_importing_ghsae_loads_neither_torch_nor_the_stages():
    import subprocess
    import sys

    code = "import sys, ghsae; print(sorted(m for m in ('torch', 'ghsae.run', 'ghsae.harvest') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dir_of_ghsae_lists_every_public_name_before_any_is_used():
    """Tab completion reads dir(): the lazy exports must be listed before their first use, and each
    listed name must resolve."""
    import subprocess
    import sys

    code = "import ghsae; print(' '.join(dir(ghsae)))"
    listed = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert set(ghsae.__all__) <= listed
    assert {"open_run", "load_sae", "Run", "pipeline", "records"} <= listed
    for name in ghsae.__all__:
        assert getattr(ghsae, name) is not None
