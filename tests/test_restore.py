"""Every kind of run this project makes restores in a fresh process from its folder alone, and
scores what it reported; the model spec round-trips; restore checks a model it is given."""

import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from float64_oracle import assert_close_to_float64, fan_ins
from jaxcnn import inference
from jaxcnn.data import load_dataset
from jaxcnn.experiments import cifar10, finetune
from jaxcnn.experiments.configs import get_config
from jaxcnn.models import MODEL_KINDS, CifarCNN, Classifier, ResNet50, ResNetTiny, build_model, model_spec
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import FitConfig, TrainState, adam, fit

ROOT = pathlib.Path(__file__).resolve().parents[1]


class UserNet(nn.Module):
    """A model of the user's own, outside jaxcnn.models."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def _user_fit(workdir, model, preprocess="unit"):
    """A plain ``fit`` call as a user writes it (no experiment), one epoch on 256 offline images."""
    data = load_dataset("offline", num_train=256, num_val=64, num_test=96)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))
    return fit(state, data, FitConfig(epochs=1, batch_size=32, eval_batch_size=32, augment=None,
                                      preprocess=preprocess), workdir, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One folder of every kind: {kind: (workdir, summary)}."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    _, _, out["cifar10"] = cifar10.run(get_config("smoke", epochs=1), root / "cifar10", progress=False)
    ft = finetune.run(finetune.get_config("smoke", phase1_epochs=1, phase2_epochs=1), root / "finetune",
                      progress=False)
    out["finetune/phase1"], out["finetune/phase2"] = ft["phase1"], ft["phase2"]
    _, _, out["fit_resnet_tiny"] = _user_fit(root / "fit_resnet_tiny",
                                             ResNetTiny(classifier_activation=None), preprocess="caffe")
    _, _, out["fit_user_net"] = _user_fit(root / "fit_user_net", UserNet())
    return root, {k: (root / k, s) for k, s in out.items()}


def readme_restore_snippet() -> str:
    """The README's restore snippet (the Python block after the ``restore-snippet`` marker)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- restore-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no <!-- restore-snippet --> python block"
    return match.group(1)


def test_the_readme_snippet_restores_every_project_run_in_a_fresh_process(runs):
    """The README's snippet, unchanged but for the folder, in a new Python process (nothing of the
    experiments imported first): each run's best checkpoint scores the test accuracy it reported."""
    _, kinds = runs
    snippet = readme_restore_snippet()
    folder = re.search(r'inference\.restore\("([^"]+)"\)', snippet).group(1)
    project = {k: v for k, v in kinds.items() if k != "fit_user_net"}
    script = "import json\nresults = {}\n"
    for kind, (workdir, _) in project.items():
        body = snippet.replace(folder, str(workdir)).replace("print(", "_ = (")
        script += f"{body}\nresults[{kind!r}] = float((probs.argmax(-1) == test.labels).mean())\n"
    script += "print(json.dumps(results))\n"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(got) == set(project) == {"cifar10", "finetune/phase1", "finetune/phase2", "fit_resnet_tiny"}
    for kind, (_, summary) in project.items():
        assert got[kind] == pytest.approx(summary["test_accuracy"], abs=1e-9), kind


def test_each_run_records_a_spec_that_rebuilds_its_model(runs):
    _, kinds = runs
    expected = {"cifar10": cifar10.build_model(get_config("smoke"), 10),
                "finetune/phase1": finetune.build_model(finetune.get_config("smoke"), 10),
                "finetune/phase2": finetune.build_model(finetune.get_config("smoke"), 10),
                "fit_resnet_tiny": ResNetTiny(classifier_activation=None)}
    for kind, model in expected.items():
        spec = RunFolder(kinds[kind][0]).read_config()["model"]
        assert spec == model_spec(model) and build_model(spec) == model, kind
    assert RunFolder(kinds["fit_resnet_tiny"][0]).read_config()["fit"]["preprocess"] == "caffe"


def test_a_model_outside_the_table_is_recorded_and_restored_when_given(runs):
    _, kinds = runs
    workdir, summary = kinds["fit_user_net"]
    assert RunFolder(workdir).read_config()["model"] == {"kind": None, "class": f"{__name__}.UserNet"}
    with pytest.raises(ValueError, match=r"a model outside jaxcnn.models \(.*UserNet\); pass the module"):
        inference.restore(workdir)
    run = inference.restore(workdir, model=UserNet())
    test = load_dataset(**run.config["data"]["source"]).test
    assert np.mean(run.predict(test.images).argmax(-1) == test.labels) == pytest.approx(summary["test_accuracy"])


def test_restore_names_the_first_mismatch_with_a_model_it_is_given(runs):
    _, kinds = runs
    workdir = kinds["cifar10"][0]
    with pytest.raises(ValueError, match=r"\['params'\]\['block1_bn1'\]\['bias'\] has shape \(8,\) "
                                         r"in the checkpoint but \(4,\) in the model"):
        inference.restore(workdir, model=CifarCNN(widths=(4, 16, 32), dense_units=32))
    with pytest.raises(ValueError, match=r"the checkpoint has \['params'\]\['block3_bn1'\]"):
        inference.restore(workdir, model=CifarCNN(widths=(8, 16), dense_units=32))
    with pytest.raises(ValueError, match=r"the model has \['params'\]\['backbone'\]"):
        inference.restore(kinds["fit_resnet_tiny"][0], model=Classifier(ResNetTiny(include_top=False,
                                                                                   pooling="avg"), 10))


def test_predict_compiles_once_per_model_and_shape(runs):
    _, kinds = runs
    run = inference.restore(kinds["cifar10"][0])
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    first = run.predict(images, batch_size=16)  # 16 + 16 + 8 padded to 16: one shape
    compiled = inference._forward._cache_size()
    for _ in range(3):
        np.testing.assert_array_equal(run.predict(images, batch_size=16), first)
    assert inference._forward._cache_size() == compiled
    logits = run.predict(images, batch_size=16, return_logits=True)
    raw = run.predict(images, batch_size=16, temperature=False)  # (the default divides by the run's temperature)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)), raw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits / (run.temperature or 1.0))), first, rtol=1e-5,
                               atol=1e-7)
    with jax.enable_x64(True):  # the float64 oracle: the run's model in float64 (logits leave it as float32)
        want = np.asarray(run.model.clone(dtype=jnp.float64).apply(
            jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), run.variables), images / 255.0, train=False), np.float64)
    assert_close_to_float64(logits, want, fan_ins(run.variables["params"]), np.abs(want).max(), what="logits")


@pytest.mark.parametrize("model", [
    CifarCNN(), CifarCNN(widths=(4,), conv_dropout="spatial", bn_epsilon=1e-5), ResNet50(),
    ResNetTiny(include_top=False, pooling="max", dtype=jnp.bfloat16),
    Classifier(ResNet50(include_top=False, pooling="avg"), num_classes=5, dropout_rate=0.5, hidden=256),
], ids=["cifar", "cifar-custom", "resnet50", "tiny-bf16", "classifier"])
def test_model_spec_round_trips_through_json(model):
    spec = json.loads(json.dumps(model_spec(model)))
    rebuilt = build_model(spec)
    assert rebuilt == model and hash(rebuilt) == hash(model)
    assert spec["kind"] in MODEL_KINDS


def test_build_model_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"kind='vgg16' is not in jaxcnn.models.MODEL_KINDS \(cifar_cnn, resnet, "
                                         r"classifier\)"):
        build_model({"kind": "vgg16"})
    with pytest.raises(ValueError, match=r"cifar_cnn has no argument\(s\) \['depth'\]"):
        build_model({"kind": "cifar_cnn", "depth": 3})
    with pytest.raises(ValueError, match="must be a dict with a 'kind'"):
        build_model(["cifar_cnn"])


def test_restore_takes_the_best_epoch_unless_asked_for_the_latest(tmp_path):
    """A folder whose best epoch (1) is not its latest (2): ``restore`` gives each one's weights."""
    from jaxcnn.train import run_config, state_to_tree

    cfg = get_config("smoke", num_train=32, num_val=16, num_test=16)
    data = cifar10.load_data(cfg)
    model = cifar10.build_model(cfg, data.num_classes)
    state = cifar10.create_state(cfg, model, data.image_shape)
    folder = RunFolder(tmp_path)
    folder.write_config(run_config(state, data, cfg.fit))
    shifted = state.replace(params=jax.tree.map(lambda a: a + 1.0, state.params))
    with folder.checkpoints() as ck:
        ck.save(1, state_to_tree(state), {"epoch": 1}, best=True)
        ck.save(2, state_to_tree(shifted), {"epoch": 2})
    best, latest = inference.restore(tmp_path), inference.restore(tmp_path, which="latest")
    assert (best.epoch, best.which, latest.epoch, latest.which) == (1, "best", 2, "latest")
    jax.tree.map(np.testing.assert_array_equal, best.variables["params"], state.params)
    jax.tree.map(np.testing.assert_array_equal, latest.variables["params"], shifted.params)
