import pytest
import yaml

from kdflow import KdflowError
from kdflow.workflow.config import SCHEMA_PATH, load_schema, validate
from tests.conftest import REPO


def test_shipped_config_is_valid_and_equals_the_schema_defaults():
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert validate(shipped) == validate({})


def test_defaults_reproduce_the_tutorial():
    c = validate({})
    assert (c["teacher"]["model"], c["student"]["model"]) == ("deepnn", "lightnn")
    for arm in ("teacher", "student"):
        assert (c[arm]["epochs"], c[arm]["batch_size"], c[arm]["lr"]) == (10, 128, 1e-3)
    assert c["kd"]["method"] == "kd"
    assert (c["kd"]["temperature"], c["kd"]["soft_target_weight"]) == (2.0, 0.25)
    assert c["teacher"]["optimizer"] == "adam" and c["teacher"]["lr_milestones"] == []
    assert c["seeds"] == [0, 1, 2] and c["data"]["val_size"] == 5000
    assert c["data"]["dataset"] == "cifar10"
    assert c["data"]["md5"] == "c58f30108f718f92721af3b95e74349a"


def test_cifar100_defaults_to_its_official_archive():
    c = validate({"data": {"dataset": "cifar100"}})
    assert c["data"]["url"].endswith("/cifar-100-python.tar.gz")
    assert c["data"]["md5"] == "eb9058c3a382ffc7106e4002c42a8d85"
    # An explicit mirror wins.
    c = validate({"data": {"dataset": "cifar100", "url": "/m/c100.tgz", "md5": "0" * 32}})
    assert (c["data"]["url"], c["data"]["md5"]) == ("/m/c100.tgz", "0" * 32)


def test_lists_sweep_and_scalars_stay_scalars():
    c = validate({"kd": {"method": ["kd", "dkd"], "temperature": ["1", "4"],
                         "soft_target_weight": [0.25, 0.5]},
                  "student": {"model": ["lightnn", "resnet8"]}})
    assert c["kd"]["temperature"] == [1.0, 4.0]
    assert c["student"]["model"] == ["lightnn", "resnet8"]
    with pytest.raises(KdflowError, match="student.model: 'resnet9' is not one of"):
        validate({"student": {"model": ["lightnn", "resnet9"]}})
    with pytest.raises(KdflowError, match="teacher.model must be one architecture"):
        validate({"teacher": {"model": ["deepnn", "resnet8"]}})
    with pytest.raises(KdflowError, match="kd.method: 'fitnets' is not one of"):
        validate({"kd": {"method": "fitnets"}})


def test_every_key_has_a_description_and_a_default():
    schema = load_schema(SCHEMA_PATH)

    def walk(node, path):
        if "$ref" in node:
            node = {**schema["$defs"][node["$ref"].rsplit("/", 1)[-1]], **node}
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}".lstrip(".")
            assert sub.get("description"), f"{where} lacks a description"
            # model is required (its default comes from the section); the
            # archive's url and md5 default to those of data.dataset.
            if key not in ("model", "url", "md5"):
                assert "default" in sub, f"{where} lacks a default"
            walk(sub, where)

    walk(schema, "")


@pytest.mark.parametrize("change,key", [
    ({"teacher": {"model": "resnet"}}, "teacher.model"),
    ({"student": {"model": "lightnn", "epochs": 0}}, "student.epochs"),
    ({"kd": {"temperature": -1}}, "kd.temperature"),
    ({"kd": {"soft_target_weight": 1.5}}, "kd.soft_target_weight"),
    ({"kd": {"temperature": [2, 0]}}, "kd.temperature.1"),
    ({"data": {"dataset": "mnist"}}, "data.dataset"),
    ({"student": {"model": "lightnn", "optimizer": "lamb"}}, "student.optimizer"),
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


# Values that passed the schema before and failed later, or silently.
@pytest.mark.parametrize("change,key,says", [
    ({"teacher": {"lr": float("inf")}}, "teacher.lr", "not a finite number"),
    ({"student": {"momentum": float("nan")}}, "student.momentum", "not a finite number"),
    ({"teacher": {"weight_decay": float("inf")}}, "teacher.weight_decay", "not a finite"),
    ({"student": {"lr_gamma": float("nan")}}, "student.lr_gamma", "not a finite number"),
    ({"kd": {"dkd": {"alpha": float("nan")}}}, "kd.dkd.alpha", "not a finite number"),
    ({"kd": {"temperature": 1e-300}}, "kd.temperature", "less than the minimum of 0.01"),
    ({"kd": {"temperature": [2, 1e-300]}}, "kd.temperature.1", "less than the minimum"),
    ({"teacher": {"epochs": 10.0}}, "teacher.epochs", "10.0 is not an integer; write 10"),
    ({"seeds": [0.0]}, "seeds.0", "0.0 is not an integer; write 0"),
    ({"student": {"batch_size": 32.5}}, "student.batch_size", "not an integer"),
    ({"seeds": [2 ** 70]}, "seeds.0", "greater than the maximum of 4294967295"),
    ({"confirm_seeds": [2 ** 32]}, "confirm_seeds.0", "greater than the maximum"),
    ({"teacher": {"lr": 100.0}}, "teacher.lr", "greater than the maximum of 10"),
    ({"student": {"momentum": 1.0}}, "student.momentum", "greater than or equal to"),
    ({"kd": {"temperature": "nan"}}, "kd.temperature", "not a finite number"),
])
def test_unusable_numbers_are_refused_naming_the_key(change, key, says):
    with pytest.raises(KdflowError, match="invalid config") as e:
        validate(change)
    line = next(ln for ln in str(e.value).splitlines() if ln.strip().startswith(key + ":"))
    assert says in line, line


def test_setting_names_round_trip_exactly():
    from kdflow.study import planner

    c = validate({"kd": {"temperature": [2.0000001, 2.0000002]}})
    names = [s for _, s, _ in planner.settings(c)]
    assert names == ["T2.0000001_w0.25", "T2.0000002_w0.25"]
    # Each job gets its exact value from its plan record, never from the name.
    for name, t in zip(names, [2.0000001, 2.0000002]):
        assert planner.lookup(c, f"lightnn/kd/{name}").values["temperature"] == t
    # 1 and 1.0 are one value: listed twice, refused.
    with pytest.raises(KdflowError, match="kd.temperature"):
        validate({"kd": {"temperature": [1, 1.0]}})


# A teacher's weights file ({url, md5}): JSON Schema's anyOf [null, {url, md5}]
# said of every mistake "is not of type 'null'"; each is named instead.
MD5 = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("key", ["checkpoint", "init"])
@pytest.mark.parametrize("value,says", [
    ({"url": "/t.pt"},
     "teacher.{key}: md5 is missing: give {{url: ..., md5: <32 hex digits>}} "
     "(get it with `md5sum FILE`)"),
    ("/t.pt",
     "teacher.{key} must be {{url, md5}}, not a string: write {{url: '/t.pt', md5: "
     "<32 hex digits>}}"),
    ({"url": "/t.pt", "md5": "<its md5>"},
     "teacher.{key}.md5 '<its md5>' is not 32 hex digits; get it with `md5sum FILE`"),
    ({"url": "/t.pt", "md5": MD5[:31]},
     f"teacher.{{key}}.md5 '{MD5[:31]}' is not 32 hex digits"),
    # YAML reads an md5 of digits only as a number.
    ({"url": "/t.pt", "md5": 12345678901234567890123456789012},
     "teacher.{key}.md5 12345678901234567890123456789012 is not 32 hex digits (YAML read "
     "it as a number: quote it)"),
    ({"url": "/t.pt", "md5": MD5, "sha256": "ab"},
     "teacher.{key}: unknown key 'sha256' (a typo?): it takes url and md5 only"),
    ({"path": "/t.pt", "md5": MD5},
     "teacher.{key}: unknown key 'path' (a typo?)"),
    ({"md5": MD5}, "teacher.{key}: url is missing"),
    ({"url": "", "md5": MD5}, "teacher.{key}.url '' is not a URL or path"),
    (7, "teacher.{key} must be {{url, md5}} or null, not a number 7"),
], ids=["no-md5", "string", "placeholder", "short-md5", "md5-as-number", "unknown-key",
        "path-for-url", "no-url", "empty-url", "number"])
def test_a_wrong_weights_file_names_the_real_problem(key, value, says):
    with pytest.raises(KdflowError, match="invalid config") as e:
        validate({"teacher": {"model": "deepnn", key: value}})
    message = str(e.value)
    assert says.format(key=key) in message, message
    assert "is not of type" not in message


def test_every_problem_of_one_weights_file_is_named():
    with pytest.raises(KdflowError) as e:
        validate({"teacher": {"model": "deepnn", "checkpoint": {"uri": "/t.pt"}}})
    lines = str(e.value).splitlines()[1:]
    assert [ln.strip().split(":")[0] for ln in lines] == ["teacher.checkpoint"] * 3
    assert any("unknown key 'uri'" in ln for ln in lines)
    assert any("url is missing" in ln for ln in lines)
    assert any("md5 is missing" in ln for ln in lines)


def test_a_student_checkpoint_is_a_teacher_key_whatever_its_form():
    for value in ("/t.pt", {"url": "/t.pt"}, {"url": "/t.pt", "md5": MD5}):
        with pytest.raises(KdflowError, match="student.checkpoint is a teacher key") as e:
            validate({"student": {"model": "lightnn", "checkpoint": value}})
        assert "is not of type" not in str(e.value)


def test_a_wrong_student_init_names_the_real_problem_as_the_teacher_s():
    # student.init is the teacher's init for the students (one start for both).
    with pytest.raises(KdflowError) as e:
        validate({"student": {"model": "lightnn", "init": {"url": "/t.pt"}}})
    assert "student.init: md5 is missing" in str(e.value)
    assert "is not of type" not in str(e.value)


def test_md5s_are_normalised_to_lower_case():
    # The rules' params hold them as given: in capitals the same md5 would
    # refetch the file and rerun everything after it.
    upper = MD5.upper()
    c = validate({"data": {"url": "/m/cifar-10-python.tar.gz", "md5": upper},
                  "teacher": {"model": "deepnn", "init": {"url": "/t.pt", "md5": upper}},
                  "student": {"model": "lightnn", "init": {"url": "/s.pt", "md5": upper}}})
    assert c["data"]["md5"] == MD5 and c["teacher"]["init"]["md5"] == MD5
    assert c["student"]["init"]["md5"] == MD5
    c = validate({"teacher": {"model": "deepnn", "checkpoint": {"url": "/t.pt", "md5": upper}}})
    assert c["teacher"]["checkpoint"] == {"url": "/t.pt", "md5": MD5}


@pytest.mark.parametrize("formats", [["int8"], ["int8", "int9"]])
def test_export_formats_without_fp32_say_that_fp32_is_required(formats):
    with pytest.raises(KdflowError, match="invalid config") as e:
        validate({"export": {"formats": formats}})
    line = next(ln for ln in str(e.value).splitlines()
                if ln.strip().startswith("export.formats:"))
    assert "lacks fp32, which is required" in line and "[fp32, int8]" in line, line
    # Said once, in words, not as JSON Schema's "does not contain items ...".
    assert "does not contain" not in str(e.value)
    assert validate({"export": {"formats": ["fp32"]}})["export"]["formats"] == ["fp32"]
