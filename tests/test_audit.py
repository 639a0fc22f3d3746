"""`conformance.audit` and `fastvision audit`: a report is reproducible, names the first broken layer of a
backend broken at one layer, gates on a baseline, plots, and refuses a report of another schema."""

from __future__ import annotations

import json

import pytest

from conformance import audit, cli, zoo

# backend -> (family, the first layer the audit must name)
ONE_LAYER_FAULTS = {
    "tests.broken_backends.one_norm_epsilon": ("llava", "model.language_model.layers.1"),
    "tests.broken_backends.one_vision_bias_dropped": ("llava", "model.vision_tower.encoder.layers.1"),
    "tests.broken_backends.wrong_rope_section": ("qwen2_vl", "model.language_model.layers.0"),
    "tests.broken_backends.drops_sliding_window": ("gemma3", "model.language_model.layers.0"),
    "tests.broken_backends.ignores_left_padding": ("llava", "model.language_model.layers.0"),
}


def quiet(_line: str) -> None:
    pass


def test_the_same_seed_gives_the_same_report():
    first = audit.audit(zoo.checkpoint("qwen2_5_vl"), "reference", progress=quiet)
    again = audit.audit(zoo.checkpoint("qwen2_5_vl"), "reference", progress=quiet)
    assert first.to_dict() == again.to_dict()
    assert first.first_break is None, audit.table(first)
    assert [row.kind for row in first.rows][-2:] == ["logits", "input gradient"]


@pytest.mark.parametrize("backend", ONE_LAYER_FAULTS)
def test_a_backend_broken_at_one_layer_is_named_at_that_layer(backend):
    family, layer = ONE_LAYER_FAULTS[backend]
    report = audit.audit(zoo.checkpoint(family), backend, progress=quiet)
    assert report.first_break == layer, audit.table(report)


def test_a_baseline_gate_names_the_layer_that_got_worse(tmp_path, capsys):
    good, broken = tmp_path / "good.json", tmp_path / "broken.json"
    assert cli.main(["audit", "--family", "llava", "--backend", "reference", "--json", str(good)]) == 0
    code = cli.main(["audit", "--family", "llava", "--backend", "tests.broken_backends.one_norm_epsilon",
                     "--baseline", str(good), "--json", str(broken)])
    output = capsys.readouterr().out
    assert code == 1
    assert "FAIL against" in output and "model.language_model.layers.1: error" in output, output[-2000:]


def test_the_plot_is_a_png(tmp_path):
    report = audit.audit(zoo.checkpoint("gemma3"), "reference", progress=quiet)
    audit.plot(report, tmp_path / "audit.png")
    data = (tmp_path / "audit.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_report_of_another_schema_is_refused(tmp_path, capsys):
    report = audit.audit(zoo.checkpoint("llava"), "reference", progress=quiet)
    path = tmp_path / "old.json"
    report.to_json(path)
    assert audit.AuditReport.from_json(path).to_dict() == report.to_dict()
    old = json.loads(path.read_text())
    old["schema"] = audit.SCHEMA_VERSION - 1
    path.write_text(json.dumps(old))
    with pytest.raises(audit.SchemaError, match="schema"):
        audit.AuditReport.from_json(path)
    assert cli.main(["audit", "--family", "llava", "--backend", "reference", "--baseline", str(path)]) == 2
    assert "schema" in capsys.readouterr().out


def test_the_checkpoint_hash_ignores_the_writers_transformers_version_and_nothing_else(tmp_path):
    """transformers stamps its version into config.json: the same zoo weights saved under 5.24 and 5.25 must
    still match their baseline, and any other config value or weight byte must not."""

    def saved(name, config, weights=b"weights"):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "model.safetensors").write_bytes(weights)
        return audit.checkpoint_hash(directory)

    config = {"model_type": "llava", "text_config": {"hidden_size": 8, "transformers_version": "5.24.0"},
              "transformers_version": "5.24.0"}
    same = saved("a", config)
    restamped = {**config, "transformers_version": "5.25.0", "text_config": {"hidden_size": 8}}
    assert saved("b", restamped) == same
    assert saved("c", {**config, "text_config": {"hidden_size": 16}}) != same
    assert saved("d", config, weights=b"weightz") != same
