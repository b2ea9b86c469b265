"""``hierasparse-gen eval --storage`` on the tiny random Llama of test_eval: e4m3 rows exist, their bytes per token
are the hand count, model-dtype ratio-0 rows still equal dense, and bad storages are explained."""

import json
import random

import pytest

from hf_models import tiny_model
from hierasparse_gen import enable
from hierasparse_gen.errors import InputError
from hierasparse_gen.evaluate import settings_grid
from hierasparse_gen.evaluate.cli import main as eval_main
from hierasparse_gen.evaluate.report import table

WORDS = "the king queen castle night ghost sword river bright cold answer stand unfold watch".split()
LAYERS, KV_HEADS, HEAD_DIM, S = 2, 2, 128, 64  # tiny_model(layers=2): 2 KV heads of 128
PREFILL, DECODE = 640, 24


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    base = tmp_path_factory.mktemp("fp8eval")
    tiny_model(layers=LAYERS).save_pretrained(base / "model")
    rng = random.Random(0)
    (base / "words.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(600)) + "\n")
    argv = ["--model", str(base / "model"), "--tokenizer", "bytes", "--text", str(base / "words.txt"),
            "--device", "cpu", "--sink", "64", "--window", "64", "--block-size", "64", "--prefill", str(PREFILL),
            "--decode", str(DECODE), "--check-steps", "0", "--quiet", "--value-ratios", "0,1", "--grid", "axes",
            "--storage", "model/model,model/float8_e4m3,float8_e4m3/float8_e4m3", "--policies", "prune_loss",
            "--json", str(base / "r.json")]
    assert eval_main(argv) == 0
    return json.loads((base / "r.json").read_text())


def _row(res, v, ks, vs):
    (row,) = [r for r in res["rows"] if r["value_ratio"] == v and (r["key_storage"], r["value_storage"]) == (ks, vs)]
    return row


def _bytes_per_token(k_store, v_store, v_ratio):
    """Hand count: 664 tokens = 10 full blocks + 1 partial; sink 1 and window 1 block -> 8 eligible blocks."""
    tokens = PREFILL + DECODE
    blocks, eligible = 11, 8
    f16_dense, f16_24 = S * HEAD_DIM * 2, S * HEAD_DIM + S * HEAD_DIM // 8
    e4_dense, e4_24 = S * HEAD_DIM + 2 * S, S * HEAD_DIM // 2 + S * HEAD_DIM // 8 + 2 * S
    k = blocks * f16_dense if k_store == "model" else (blocks - eligible) * f16_dense + eligible * e4_dense
    n_sparse = eligible if v_ratio == 1 else 0
    if v_store == "model":
        v = (blocks - n_sparse) * f16_dense + n_sparse * f16_24
    else:
        v = (blocks - eligible) * f16_dense + (eligible - n_sparse) * e4_dense + n_sparse * e4_24
    table_bytes = 2 * KV_HEADS * blocks * 4  # two int32 tables of max_blocks = ceil(664 / 64)
    return LAYERS * (KV_HEADS * (k + v) + table_bytes) / tokens


def test_every_storage_and_ratio_has_a_row(result):
    got = {(r["key_storage"], r["value_storage"], r["value_ratio"]) for r in result["rows"]}
    want = {(ks, vs, v) for ks, vs in (("model", "model"), ("model", "float8_e4m3"),
                                       ("float8_e4m3", "float8_e4m3")) for v in (0.0, 1.0)}
    assert got == want and len(result["rows"]) == 6


@pytest.mark.parametrize("ks,vs", [("model", "model"), ("model", "float8_e4m3"), ("float8_e4m3", "float8_e4m3")])
@pytest.mark.parametrize("v", [0.0, 1.0])
def test_bytes_per_token_are_the_hand_count(result, ks, vs, v):
    row = _row(result, v, ks, vs)
    assert row["bytes_per_token"] == pytest.approx(_bytes_per_token(ks, vs, v), rel=1e-12)
    assert row["dense_bytes_per_token"] == pytest.approx(LAYERS * KV_HEADS * 2 * HEAD_DIM * 2 * 11 * S / 664)


def test_model_rows_at_ratio_zero_equal_dense_and_e4m3_rows_do_not(result):
    plain = _row(result, 0.0, "model", "model")
    assert plain["kl"] < 1e-8 and plain["top1"] == 1.0
    assert plain["ppl"] == pytest.approx(result["dense"]["ppl"], rel=1e-6)
    v8 = _row(result, 0.0, "model", "float8_e4m3")
    kv8 = _row(result, 0.0, "float8_e4m3", "float8_e4m3")
    assert 0 < v8["kl"] and 0 < kv8["kl"]
    # e4m3 dense V loses less than 2:4 V in the model dtype (a 3-bit mantissa against half the values)
    assert v8["kl"] < _row(result, 1.0, "model", "model")["kl"]
    assert v8["bytes_per_token"] < plain["bytes_per_token"] and kv8["bytes_per_token"] < v8["bytes_per_token"]


def test_the_table_names_the_storage(result):
    text = table(result)
    assert "store k/v" in text and "model/e4m3" in text and "e4m3/e4m3" in text


def test_settings_grid_crosses_storages():
    got = settings_grid([0.0], [0.0, 0.5], sink=64, window=64,
                        storages=[("model", "model"), ("model", "float8_e4m3"), ("model", "model")])
    assert [(s.value_ratio, s.value_storage) for s in got] == [
        (0.0, "model"), (0.5, "model"), (0.0, "float8_e4m3"), (0.5, "float8_e4m3")]
    assert got[2].label() == "k0/v0 model/e4m3" and got[0].label() == "k0/v0"
    with pytest.raises(InputError, match="value storage 'fp8' is not a storage.*Fix:"):
        settings_grid([0.0], [0.0], sink=64, window=64, storages=[("model", "fp8")])


def test_a_bad_storage_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--model", "x", "--storage", "model"])
    assert "KEY/VALUE pair" in capsys.readouterr().err


def test_enable_refuses_e4m3_on_a_library_without_its_kernels():
    from types import SimpleNamespace
    lib = SimpleNamespace(variants=[], spec_name="demo")  # a build with no e4m3 tier
    with pytest.raises(InputError, match="value_storage 'float8_e4m3' need the e4m3 packers.*library 'demo' lacks "
                                         "the decode kernel. Fix: add the tier {k: mixed, v: mixed, k_storage: model, "
                                         "v_storage: float8_e4m3}"):
        enable(tiny_model(layers=1), lib, key_ratio=0.0, value_ratio=0.0, value_storage="float8_e4m3")
    with pytest.raises(InputError, match="key_storage 'e5m2' is not a storage"):
        enable(tiny_model(layers=1), key_ratio=0.0, value_ratio=0.0, key_storage="e5m2", backend="simulate")
