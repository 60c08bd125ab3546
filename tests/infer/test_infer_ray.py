"""reference infer --engine ray: on a local Ray cluster, one actor per replica, the output one
process's generate() gives, in input order, skipping the ids an earlier run committed; and a
one-line error naming the extra when Ray is missing."""

from __future__ import annotations

import sys

import pytest
from jobs import NEW, check, data, generated, precommit, valid_keys

from reference.errors import InputError
from reference.infer import Infer


def test_a_ray_pipeline_writes_the_one_process_outputs_and_resumes(model, expected, tmp_path,
                                                                   monkeypatch) -> None:
    import ray  # installed by the `ray` extra, as CI does: this test runs, never skips

    rows = data(tmp_path)
    out, count = tmp_path / "out.jsonl", tmp_path / "count"
    earlier = precommit(out, [e for e in expected if "output" in e][:3])
    monkeypatch.setenv("REFERENCE_INFER_TEST_COUNT", str(count))  # before the actors start, to reach them
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        n = Infer(model, rows, out, 2, batch_size=2, max_new_tokens=NEW, engine="ray").run()
    finally:
        ray.shutdown()
    assert n == len(expected) - len(earlier)
    check(out, expected)
    made = generated(count)
    assert set(made) == valid_keys(expected) - earlier and set(made.values()) == {1}


def test_without_ray_the_error_names_the_extra(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what find_spec sees for a package not installed
    with pytest.raises(InputError, match=r"^needs ray: pip install 'reference\[ray\]'$"):
        Infer(model, data(tmp_path), tmp_path / "out.jsonl", 2, engine="ray").run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
