"""The activation table (sparsecc/activations.py): its references against float64 formulas written from the
definitions in docs/kernels.md, its FX recognition data, the views other modules expose, and that no module
of the package defines an activation a second time.

The Triton lines run under the interpreter in tests/codegen/test_activation_table_kernels.py; the FX
spellings go through the passes in tests/passes/test_activation_spellings.py.
"""

import ast
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsecc import activations as table
from sparsecc.activations import ACTIVATION_TABLE, BY_NAME, activation, is_square, named_by_probe, probe, spelled_by
from tests import zoo

ROOT = Path(__file__).resolve().parent.parent

DEFINITIONS = zoo.ACTIVATION_DEFINITIONS   # float64, from docs/kernels.md


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.linspace(-10, 10, 401, dtype=torch.float64),
                      4 * torch.randn(500, generator=gen, dtype=torch.float64)])


def test_the_table_holds_the_documented_activations_in_name_order():
    assert [a.name for a in ACTIVATION_TABLE] == sorted(DEFINITIONS)
    assert list(BY_NAME) == sorted(DEFINITIONS)
    for act in ACTIVATION_TABLE:
        assert act.definition and "\n" not in act.definition
        assert act.triton and all("v = " in line for line in act.triton)


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_reference_and_in_place_form_match_the_definition(name):
    x = _inputs()
    act = activation(name)
    torch.testing.assert_close(act.torch(x), DEFINITIONS[name](x))
    assert torch.equal(x, _inputs())  # the reference leaves its input alone
    if act.inplace is not None:
        y = x.clone()
        out = act.inplace(y)
        assert out.data_ptr() == y.data_ptr()
        torch.testing.assert_close(y, DEFINITIONS[name](x))


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; expected one of \['gelu', 'gelu_tanh'"):
        activation("tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        activation(None)


def test_probe_names_each_definition_and_nothing_else():
    for name, fn in DEFINITIONS.items():
        assert named_by_probe(fn(probe())) == name
        assert named_by_probe(fn(probe()).float()) == name  # a float32 evaluation is close enough
    quick_gelu = probe() * torch.sigmoid(1.702 * probe())  # no kernel computes it: not named
    # relu6 and a clamp at 12 agree with relu over [-6, 6]: the probe reaches past them.
    for other in (torch.tanh(probe()), quick_gelu, probe(), F.relu6(probe()), probe().clamp(0, 12)):
        assert named_by_probe(other) is None
    assert named_by_probe(DEFINITIONS["gelu"](probe())[:-1]) is None
    assert named_by_probe(None) is None


def test_call_spellings_from_the_recognition_data():
    x = object()  # the tensor operand: spelled_by reads only the target and the other arguments
    assert spelled_by("call_function", F.gelu, (x,), {}) == "gelu"
    assert spelled_by("call_function", F.gelu, (x,), {"approximate": "none"}) == "gelu"
    assert spelled_by("call_function", F.gelu, (x,), {"approximate": "tanh"}) == "gelu_tanh"
    assert spelled_by("call_function", F.gelu, (x,), {"approximate": "other"}) is None
    assert spelled_by("call_function", torch.relu, (x,), {}) == "relu"
    assert spelled_by("call_function", F.relu, (x,), {"inplace": False}) == "relu"
    assert spelled_by("call_method", "relu", (x,), {}) == "relu"
    assert spelled_by("call_function", F.silu, (x,), {}) == "silu"
    assert spelled_by("call_function", torch.tanh, (x,), {}) is None
    assert spelled_by("call_method", "silu", (x,), {}) is None  # torch.Tensor has no silu method
    assert spelled_by("call_module", "act", (x,), {}) is None
    assert is_square("call_function", torch.square, (x,)) and is_square("call_method", "square", (x,))
    assert is_square("call_function", operator.pow, (x, 2)) and is_square("call_method", "pow", (x, 2.0))
    assert is_square("call_method", "__pow__", (x, 2)) and is_square("call_function", torch.pow, (x, 2))
    assert not is_square("call_function", operator.pow, (x, 3)) and not is_square("call_function", torch.exp, (x,))
    assert table.squared("relu") == "relu2" and table.squared("silu") is None


def test_every_spelling_is_a_pointwise_op_of_normalize():
    from sparsecc.passes import normalize

    assert table.FX_FUNCTIONS <= normalize._POINTWISE_FUNCS
    assert table.FX_METHODS <= normalize._POINTWISE_METHODS
    assert all(f in table.FX_FUNCTIONS for a in ACTIVATION_TABLE for f in a.functions)


def test_public_names_are_views_of_the_table():
    from sparsecc.codegen import epilogue
    from sparsecc.codegen.activation_sparse import ACTIVATIONS
    from sparsecc.codegen.semi_structured_linear import FUSED_ACTIVATIONS

    assert list(ACTIVATIONS) == [a.name for a in ACTIVATION_TABLE]
    assert all(ACTIVATIONS[a.name] is a.torch for a in ACTIVATION_TABLE)
    assert dict(epilogue.EPILOGUES) == {"none": "identity", **{a.name: a.definition for a in ACTIVATION_TABLE}}
    assert FUSED_ACTIVATIONS == tuple(epilogue.EPILOGUES)
    assert all(epilogue.activation_ref(a.name) is a.torch for a in ACTIVATION_TABLE)
    x = _inputs()
    assert torch.equal(epilogue.activation_ref("none")(x), x)
    for view in (ACTIVATIONS, epilogue.EPILOGUES, BY_NAME):
        with pytest.raises(TypeError):
            view["tanh"] = torch.tanh  # read-only: a new activation goes into the table


def test_generated_sources_are_the_table_lines():
    from sparsecc.codegen.epilogue import activation_switch_source, epilogue_source

    switch = activation_switch_source("_activation")
    assert "def _activation(v, ACTIVATION: tl.constexpr):" in switch
    compile(switch, "<switch>", "exec")
    for act in ACTIVATION_TABLE:
        body = epilogue_source(f"act:{act.name}").split("v = acc\n")[1]
        assert body == "".join(f"    {line}\n" for line in act.triton) + "    return v\n"
        branch = switch.split(f"ACTIVATION == {act.name!r}:\n")[1]
        assert branch.startswith("".join(f"        {line}\n" for line in act.triton))
    with pytest.raises(ValueError, match="identifier"):
        activation_switch_source("not a name")


# ------------------------------------------------------------------ no second definition

# Attribute names whose use computes or spells one of the table's activations (torch or Triton); only the table
# may use them. The building blocks of hand-written forms (sigmoid, erf, tanh) stay allowed in passes/ (normalize
# lists them) but not in codegen/, where they would compute an activation.
_ACTIVATION_ATTRS = {"gelu", "silu", "relu", "relu_", "square_"}
_KERNEL_ATTRS = {"sigmoid", "erf", "tanh"}
_PACKAGES = ("sparsecc", "passes", "codegen")


def _definitions_elsewhere():
    names = set(BY_NAME)
    for package in _PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "sparsecc" / "activations.py":
                continue
            banned = _ACTIVATION_ATTRS | (_KERNEL_ATTRS if package == "codegen" else set())
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Attribute) and node.attr in banned:
                    yield f"{where} uses .{node.attr}"
                elif isinstance(node, ast.Constant) and node.value in names:
                    yield f"{where} names the activation {node.value!r}"
                elif isinstance(node, ast.keyword) and node.arg == "approximate":
                    yield f"{where} passes approximate="


def test_no_module_defines_an_activation_a_second_time():
    """Activation code, references, spellings and names live in sparsecc/activations.py alone."""
    found = list(_definitions_elsewhere())
    assert not found, "\n".join(found)


def test_the_scan_finds_a_second_definition(tmp_path, monkeypatch):
    """The scan is not vacuous: a copy of the table's data in another module is found."""
    fake = tmp_path / "codegen"
    fake.mkdir()
    (fake / "k.py").write_text("def act(v, name):\n    if name == 'silu':\n        return v * tl.sigmoid(v)\n"
                               "    return F.gelu(v, approximate='tanh')\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # the scan reads ROOT when it runs
    found = "\n".join(_definitions_elsewhere())
    assert "names the activation 'silu'" in found and "uses .sigmoid" in found and "uses .gelu" in found
    assert "approximate=" in found
