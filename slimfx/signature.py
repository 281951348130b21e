"""Checking a compiled model's inputs against what it was compiled for: clear errors, naming the argument."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
import torch.utils._pytree as pytree

from . import ir


class InputError(ValueError):
    """A call's inputs do not fit the compiled graph; the message names the argument and what it expected."""


@dataclasses.dataclass
class InputSignature:
    model_name: str
    forward: inspect.Signature
    positional: list[str]            # parameter names given positionally at compile time
    keywords: list[str]              # ... and by keyword
    leaves: list[tuple[str, object]] # per flattened input: its name and the captured value (FakeTensor or constant)
    in_spec: object                  # pytree spec of (args, kwargs) at capture, or None
    ranges: dict                     # symbol -> (lo, hi) for dynamic dims

    @classmethod
    def from_capture(cls, model: torch.nn.Module, captured: ir.Captured) -> "InputSignature":
        sig = inspect.signature(model.forward)
        names = [p for p in sig.parameters]
        n_pos = len(captured.example_args)
        placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
        flat_args, in_spec = pytree.tree_flatten((captured.example_args, captured.example_kwargs))
        leaves = []
        for i, p in enumerate(placeholders):
            v = ir.meta.val(p)
            leaves.append((p.name, v if v is not None else (flat_args[i] if i < len(flat_args) else None)))
        return cls(type(model).__name__, sig, names[:n_pos], list(captured.example_kwargs), leaves, in_spec,
                   dict(captured.ranges))

    def to_json(self) -> dict:
        """As JSON-able data (``slimfx.save``): the forward's parameter names and kinds (defaults are not
        needed to check a call), how the inputs were given, and the non-tensor inputs' compiled values."""
        params = [{"name": p.name, "kind": p.kind.name, "default": p.default is not p.empty}
                  for p in self.forward.parameters.values()]
        consts = {name: v for name, v in self.leaves if not isinstance(v, torch.Tensor)}
        bad = {k: v for k, v in consts.items() if not (v is None or isinstance(v, (bool, int, float, str)))}
        if bad:
            raise ValueError(f"{self.model_name}: compiled non-tensor inputs {bad} cannot be saved as JSON")
        from .ir.serialize import plain
        return {"model_name": self.model_name, "parameters": params, "positional": self.positional,
                "keywords": self.keywords, "constants": plain(consts),     # inf / nan as {"float": "inf"}
                "in_spec": None if self.in_spec is None else pytree.treespec_dumps(self.in_spec)}

    @classmethod
    def from_json(cls, data: dict, gm, ranges: dict) -> "InputSignature":
        """The signature ``to_json`` saved, over a loaded graph (its placeholders' values, ``ranges`` of its
        symbols)."""
        P = inspect.Parameter
        kinds = {k.name: k for k in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.VAR_POSITIONAL, P.KEYWORD_ONLY,
                                     P.VAR_KEYWORD)}
        params = [inspect.Parameter(p["name"], kinds[p["kind"]],
                                    default=None if p["default"] else inspect.Parameter.empty)
                  for p in data["parameters"]]
        from .ir.serialize import FormatError, load_spec, unplain
        positional, keywords = list(data["positional"]), list(data["keywords"])
        # checked here, not at the first call: a name the forward does not have would refuse every call
        names = [p.name for p in params]
        if positional != names[:len(positional)]:
            raise FormatError(f"signature.positional {positional} is not the start of the forward's parameters "
                              f"{names}")
        takes = {p.name for p in params if p.kind is not P.POSITIONAL_ONLY and p.kind is not P.VAR_POSITIONAL}
        unknown = [k for k in keywords if not isinstance(k, str) or k in positional
                   or (k not in takes and not any(p.kind is P.VAR_KEYWORD for p in params))]
        if unknown or len(set(keywords)) != len(keywords):
            raise FormatError(f"signature.keywords {keywords}: {unknown or 'a repeated name'} cannot be given by "
                              f"keyword to the forward's parameters {names} after positional {positional}")
        constants = unplain(data["constants"])
        leaves = []
        for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
            v = ir.meta.val(p)
            leaves.append((p.name, v if isinstance(v, torch.Tensor) else constants.get(p.name, v)))
        spec = load_spec(data["in_spec"], "signature in_spec")
        return cls(data["model_name"], inspect.Signature(params), positional, keywords, leaves, spec, dict(ranges))

    def _fail(self, msg: str):
        raise InputError(f"{self.model_name} (compiled): {msg}")

    def check(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Arrange a call's inputs as at capture and check each against its captured shape and dtype."""
        try:
            bound = self.forward.bind(*args, **kwargs)
        except TypeError as e:
            self._fail(f"{e}")
        given = dict(bound.arguments)
        for name in list(given):
            p = self.forward.parameters[name]
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                given.update(given.pop(name))
        expected = self.positional + self.keywords
        missing = [n for n in expected if n not in given]
        if missing:
            self._fail(f"missing input(s) {missing}: the model was compiled with {expected}")
        extra = [n for n in given if n not in expected]
        if extra:
            self._fail(f"input(s) {extra} were not given at compile time (compiled with {expected}); "
                       f"compile with them in the example inputs")
        # forward(self, *args): the captured call's positional values are the starred ones, one by one
        args = tuple(v for n in self.positional for v in
                     (given[n] if self.forward.parameters[n].kind is inspect.Parameter.VAR_POSITIONAL else (given[n],)))
        kwargs = {n: given[n] for n in self.keywords}
        flat, spec = pytree.tree_flatten((args, kwargs))
        if self.in_spec is not None and spec != self.in_spec:
            tensors = {name for name, v in self.leaves if isinstance(v, torch.Tensor)}
            for name, v in [*zip(self.positional, args), *kwargs.items()]:
                if name in tensors and not isinstance(v, torch.Tensor):     # e.g. a list of token ids
                    self._fail(f"input {name!r} must be a tensor, got {type(v).__name__}")
            self._fail(f"the inputs' structure differs from the compiled one:\n  got      {spec}\n  expected {self.in_spec}")
        symbols: dict[str, tuple[int, str]] = {}
        derived: list = []        # dims tied to others by an expression (2*s0, s0 + s1): checked once bound
        for (name, exp), got in zip(self.leaves, flat):
            if isinstance(exp, torch.Tensor):
                self._check_tensor(name, exp, got, symbols, derived)
            elif exp is not None and got != exp and not (_isnan(got) and _isnan(exp)):
                self._fail(f"input {name!r} is {got!r}, but the graph was compiled for {exp!r}")
        self._check_derived(derived, symbols)
        return args, kwargs

    def diverged(self, args: tuple, kwargs: dict) -> Optional[str]:
        """For an error inside the graph on checked inputs: the dynamic dims that were equal in the example but
        that the capture gave symbols of their own (export found no tie between them: an attention mask's batch
        and the ids'), which differ in this call; None when there are none. A model may need them equal without
        export saying so (transformers' mask indexing by the ids' batch), and the graph then fails deep inside."""
        from .ir.serialize import example_hint
        groups: dict[int, dict[str, tuple[int, str]]] = {}
        for (name, exp), got in zip(self.leaves, pytree.tree_leaves((args, kwargs))):
            if not (isinstance(exp, torch.Tensor) and isinstance(got, torch.Tensor) and got.dim() == exp.dim()):
                continue
            for d, (g, e) in enumerate(zip(got.shape, exp.shape)):
                hint = getattr(getattr(e, "node", None), "hint", None)
                expr = None if isinstance(e, int) else _expr(e)
                if hint is not None and expr is not None and expr.is_symbol:
                    hint = example_hint(e)
                    groups.setdefault(int(hint), {}).setdefault(str(e), (g, f"{name!r} dim {d}"))
        pairs = [(hint, dims) for hint, dims in groups.items() if len({g for g, _ in dims.values()}) > 1]
        if not pairs:
            return None
        hint, dims = pairs[0]
        said = ", ".join(f"{where} is {g}" for g, where in dims.values())
        return (f"slimfx: in this call {said}, which were all {hint} in the example inputs; the capture found no tie "
                f"between them, but the model may need them equal")

    def _check_tensor(self, name, exp, got, symbols, derived):
        if not isinstance(got, torch.Tensor):
            self._fail(f"input {name!r} must be a tensor, got {type(got).__name__}")
        if got.is_meta:                # no data to run on: every backend would fail naming nothing
            self._fail(f"input {name!r} is on the meta device (a tensor without data); give a tensor on the CPU "
                       f"or the device the backend runs on")
        if got.dtype != exp.dtype:
            self._fail(f"input {name!r} has dtype {got.dtype}, expected {exp.dtype}")
        if got.dim() != exp.dim():
            self._fail(f"input {name!r} has {got.dim()} dims {tuple(got.shape)}, expected {exp.dim()} "
                       f"{tuple(str(d) for d in exp.shape)}")
        for d, (g, (kind, e)) in enumerate(zip(got.shape, self._dims(exp))):
            if kind == "static" or kind == "fixed":
                if g != e:
                    why = ("the model fixes it: export specialized it to the example's size, e.g. for a Python "
                           "loop over it" if kind == "fixed" else "compile with dynamic=True to let it vary")
                    self._fail(f"input {name!r} dim {d} is {g}, but it was compiled static at {e} ({why})")
            elif kind == "derived":
                derived.append((name, d, g, e))
                if all(str(s) in symbols for s in e.free_symbols):     # checkable now: in dim order
                    self._check_derived([derived.pop()], symbols)
            else:
                self._bind(e, g, f"{name!r} dim {d}", symbols)

    def _dims(self, exp: torch.Tensor) -> list[tuple[str, object]]:
        """What each dim of the compiled input ``exp`` asks, worked out once per input (printing a SymInt's
        expression on every call was most of the check's time, 2 ms per decode step of a 32-layer model):
        ("static", size), ("fixed", size) for a dim export specialized under dynamic=True (a SymInt 5),
        ("derived", expression) for a dim tied to others (2*s0, s0 + s1), or ("symbol", its name)."""
        plans = self.__dict__.setdefault("_dim_plans", {})
        env = next((e.node.shape_env for e in exp.shape if not isinstance(e, int)
                    and getattr(getattr(e, "node", None), "shape_env", None) is not None), None)
        version = len(env.replacements) if env is not None else 0   # a pass that fixes a symbol adds one
        plan = plans.get(id(exp))
        if plan is None or plan[0] is not exp or plan[1] != version:
            plan = []
            for e in exp.shape:
                if isinstance(e, int):
                    plan.append(("static", e))
                elif str(e).lstrip("-").isdigit():
                    plan.append(("fixed", int(str(e))))
                elif (expr := _expr(e)) is not None and not expr.is_symbol:
                    plan.append(("derived", expr))
                else:
                    plan.append(("symbol", str(e)))
            plans[id(exp)] = plan = (exp, version, plan)     # exp held: its id stays its own
        return plan[2]

    def _bind(self, sym: str, g: int, where: str, symbols: dict) -> None:
        lo, hi = self.ranges.get(sym, (0, None))
        if g < lo or (hi is not None and g > hi):
            self._fail(f"input {where} is {g}, outside the compiled range [{lo}, {hi or 'inf'}]")
        if sym in symbols and symbols[sym][0] != g:
            self._fail(f"input {where} is {g}, but {symbols[sym][1]} is {symbols[sym][0]}; "
                       f"the model needs them equal ({sym})")
        symbols.setdefault(sym, (g, where))

    def _evaluate(self, expr, free: dict, symbols: dict):
        fns = self.__dict__.setdefault("_derived_fns", {})
        return _evaluate_with(fns, expr, free, symbols)

    def _check_derived(self, derived: list, symbols: dict) -> None:
        """Dims that are expressions of the symbols (``y`` as long as ``cat([x, x])``: 2*s0): each must equal its
        expression over the sizes the other inputs bind. One whose expression has a single symbol no other input
        binds binds it (solved for: an integer in its range); one with several unbound is left to the graph."""
        import sympy
        pending = list(derived)
        while pending:
            left = []
            for name, d, g, expr in pending:
                free = {str(s): s for s in expr.free_symbols}
                unbound = [k for k in free if k not in symbols]
                if len(unbound) > 1:
                    left.append((name, d, g, expr))
                    continue
                if unbound:
                    sym = free[unbound[0]]
                    try:
                        roots = sympy.solve(sympy.Eq(expr.subs({free[k]: symbols[k][0] for k in free
                                                                if k in symbols}), g), sym)
                    except (NotImplementedError, TypeError, ValueError):    # (floor division and the like)
                        left.append((name, d, g, expr))
                        continue
                    ints = [int(r) for r in roots if r.is_number and r.is_integer and r >= 0]
                    if not ints:
                        self._fail(f"input {name!r} dim {d} is {g}, but the model needs it to be {expr} for an "
                                   f"integer {sym} >= 0")
                    lo, hi = self.ranges.get(str(sym), (0, None))
                    if ints[0] < lo or (hi is not None and ints[0] > hi):
                        self._fail(f"input {name!r} dim {d} is {g}: as {expr} that makes {sym} = {ints[0]}, outside "
                                   f"its compiled range [{lo}, {hi or 'inf'}]")
                    self._bind(str(sym), ints[0], f"{name!r} dim {d} (as {expr})", symbols)
                    continue
                want = self._evaluate(expr, free, symbols)
                if want is None:
                    continue
                if int(want) != g:
                    given = ", ".join(f"{k} = {symbols[k][0]} from {symbols[k][1]}" for k in sorted(free))
                    self._fail(f"input {name!r} dim {d} is {g}, but the model needs it to be {expr} = {int(want)} "
                               f"({given})")
            if len(left) == len(pending):
                return
            pending = left


def _evaluate_with(fns: dict, expr, free: dict, symbols: dict):
    """``expr`` at the bound sizes, by a function made once per expression (sympy's subs per call would cost a
    decode step ~0.1 ms); None when it is no number."""
    if expr not in fns:
        import sympy
        names = sorted(free)
        try:
            fns[expr] = (names, sympy.lambdify([free[k] for k in names], expr, modules="math"))
        except Exception:                  # noqa: BLE001 - an expression lambdify cannot write: subs each time
            fns[expr] = (names, None)
    names, fn = fns[expr]
    if fn is not None:
        try:
            return int(fn(*(symbols[k][0] for k in names)))
        except Exception:                  # noqa: BLE001 - torch's own sympy functions (FloorDiv) lambdify cannot
            fns[expr] = (names, None)      # run: subs from now on
    want = expr.subs({free[k]: symbols[k][0] for k in free})
    return want if want.is_number else None


def _expr(e):
    """The sympy expression of a symbolic dim (a SymInt's), or None."""
    node = getattr(e, "node", None)
    return getattr(node, "expr", None)


def _isnan(v) -> bool:
    return isinstance(v, float) and v != v
