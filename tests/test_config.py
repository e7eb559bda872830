import pytest
import yaml

from kdflow import KdflowError
from kdflow.config import SCHEMA_PATH, load_schema, validate
from tests.conftest import REPO


def test_shipped_config_is_valid_and_equals_the_schema_defaults():
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert validate(shipped) == validate({})


def test_defaults_reproduce_the_tutorial():
    c = validate({})
    assert (c["teacher"]["model"], c["student"]["model"]) == ("deepnn", "lightnn")
    for arm in ("teacher", "student"):
        assert (c[arm]["epochs"], c[arm]["batch_size"], c[arm]["lr"]) == (10, 128, 1e-3)
    assert c["kd"] == {"temperature": 2.0, "soft_target_weight": 0.25}
    assert c["seeds"] == [0, 1, 2] and c["data"]["val_size"] == 5000


def test_every_key_has_a_description_and_a_default():
    schema = load_schema(SCHEMA_PATH)

    def walk(node, path):
        if "$ref" in node:
            node = {**schema["$defs"][node["$ref"].rsplit("/", 1)[-1]], **node}
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}".lstrip(".")
            assert sub.get("description"), f"{where} lacks a description"
            if key != "model":  # required, its default comes from the section
                assert "default" in sub, f"{where} lacks a default"
            walk(sub, where)

    walk(schema, "")


@pytest.mark.parametrize("change,key", [
    ({"teacher": {"model": "resnet"}}, "teacher.model"),
    ({"student": {"model": "lightnn", "epochs": 0}}, "student.epochs"),
    ({"kd": {"temperature": -1}}, "kd.temperature"),
    ({"kd": {"soft_target_weight": 1.5}}, "kd.soft_target_weight"),
    ({"data": {"md5": "xyz"}}, "data.md5"),
    ({"seeds": []}, "seeds"),
    ({"kdd": {}}, "'kdd' was unexpected"),
])
def test_bad_values_name_their_key(change, key):
    with pytest.raises(KdflowError, match="invalid config") as e:
        validate(change)
    assert key in str(e.value)


def test_command_line_strings_are_coerced():
    # `snakemake --config 'kd={temperature: 4}'` delivers '4', a string.
    c = validate({"kd": {"temperature": "4"}, "seeds": ["0", "3"]})
    assert c["kd"]["temperature"] == 4.0 and c["seeds"] == [0, 3]
    with pytest.raises(KdflowError, match="kd.temperature"):
        validate({"kd": {"temperature": "hot"}})
