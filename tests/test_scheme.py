import pytest

from lowbit import Granularity, Observer, QuantArgs, UserError, parse_scheme


def test_parse_w4a8kv4_defaults():
    s = parse_scheme("W4A8KV4")
    assert s.weights == QuantArgs(bits=4, granularity="channel")
    assert s.inputs == QuantArgs(bits=8, granularity="token")
    assert s.keys == s.values == QuantArgs(bits=4, granularity="token")
    assert (s.w_bits, s.a_bits, s.k_bits, s.v_bits) == (4, 8, 4, 4)


def test_missing_parts_and_16_mean_unquantized():
    s = parse_scheme("W4A16")
    assert s.inputs is None and s.keys is None and s.values is None
    assert parse_scheme("W16A16KV16").is_noop
    assert parse_scheme("W8A8").keys is None


def test_suffixes():
    s = parse_scheme("W4g64aA8tK4V8s")
    assert s.weights.granularity is Granularity.GROUP and s.weights.group_size == 64 and not s.weights.symmetric
    assert s.inputs.granularity is Granularity.TENSOR and s.inputs.dynamic
    assert s.keys.bits == 4 and s.values.bits == 8 and not s.values.dynamic
    assert s.values.granularity is Granularity.TENSOR


def test_clipping_suffixes():
    s = parse_scheme("W4g64mA8c90KV4c95")
    assert s.weights.observer is Observer.MSE and s.weights.clip_ratio == 1.0
    assert s.inputs.clip_ratio == 0.9 and s.inputs.observer is Observer.MINMAX
    assert s.keys.clip_ratio == s.values.clip_ratio == 0.95
    assert s.name == "W4g64mA8c90KV4c95"


@pytest.mark.parametrize(
    "name", ["W4A8KV4", "W4g64A16", "W8aA8tKV8", "W3g32aA16K4V8", "W8A8sKV8s", "W16A16KV16", "W4mA8c90KV4c95", "W8A8sc80", "W4fA16", "W4g64fmA8fKV4f"]
)
def test_name_round_trip(name):
    assert parse_scheme(parse_scheme(name).name) == parse_scheme(name)


@pytest.mark.parametrize(
    "name, words",
    [
        ("W0A8", "weight bits must be 2-8"),
        ("W1A16", "weight bits must be 2-8"),
        ("W17A16", "weight bits must be 2-8"),
        ("W4A17", "activation bits"),
        ("W4A8KV1", "KV bits"),
        ("W4x", "unknown suffix"),
        ("W4A8W4", "sets W twice"),
        ("Q4A8", "cannot parse"),
        ("", "empty"),
        ("W4g0", "group size must be positive"),
        ("W4s", "weights are always"),
        ("W4g64t", "both per-group and per-tensor"),
        ("W4A8c0", "percentage of the range"),
        ("W4A8c150", "percentage of the range"),
        ("W8A8sm", "MSE clip search"),
        ("W4afA16", "'f' \\(full signed range\\) is for symmetric"),
    ],
)
def test_invalid_names_fail_with_the_field(name, words):
    with pytest.raises(UserError, match=words):
        parse_scheme(name)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 17, True])
def test_quant_args_bits(bits):
    with pytest.raises(UserError, match="bits"):
        QuantArgs(bits=bits)


def test_quant_args_validation():
    with pytest.raises(UserError, match="group_size"):
        QuantArgs(bits=4, granularity="group")
    with pytest.raises(UserError, match="only valid with granularity 'group'"):
        QuantArgs(bits=4, group_size=64)
    with pytest.raises(UserError, match="clip_ratio"):
        QuantArgs(bits=4, clip_ratio=0.0)
    with pytest.raises(UserError, match="static"):
        QuantArgs(bits=8, granularity="token", dynamic=False)
    with pytest.raises(UserError, match="granularity must be one of"):
        QuantArgs(bits=8, granularity="row")
    with pytest.raises(UserError, match="observer must be one of"):
        QuantArgs(bits=8, observer="percentile")


def test_full_range_suffix():
    w = parse_scheme("W4fA16").weights
    assert w.full_range and w.symmetric and w.max_steps == 7.5
    assert parse_scheme("W4A16").weights.max_steps == 7
    with pytest.raises(UserError, match="full_range is for symmetric"):
        QuantArgs(bits=4, symmetric=False, full_range=True)


def test_scale_format_suffixes_round_trip():
    from lowbit.scheme import parse_scheme

    s = parse_scheme("W4g64hA8bKV4h")
    assert s.weights.scale_format == "float16" and s.inputs.scale_format == "bfloat16" and s.keys.scale_format == "float16"
    assert parse_scheme(s.name) == s and s.name == "W4g64hA8bKV4h"
    assert parse_scheme("W4A8").weights.scale_format == "float32"


@pytest.mark.parametrize(
    "bad, needle",
    [("W4hb", "sets its scale format twice"), ("W4hh", "sets its scale format twice"), ("W4x", "unknown suffix")],
)
def test_scale_format_mistakes(bad, needle):
    from lowbit.scheme import parse_scheme

    with pytest.raises(UserError, match=needle):
        parse_scheme(bad)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"bits": 4, "scale_format": "fp8"}, "scale format must be one of"),
        ({"bits": 4, "element": "fp4"}, "element format must be one of"),
        ({"bits": 4, "symmetric": "false"}, "symmetric must be true or false"),
        ({"bits": 4, "dynamic": 1}, "dynamic must be true or false"),
    ],
)
def test_quant_args_are_type_checked(kwargs, needle):
    from lowbit.scheme import QuantArgs

    with pytest.raises(UserError, match=needle):
        QuantArgs(**kwargs)
