"""Reference PyTorch modules whose weights fastrec serves: :class:`DLRM` and :class:`TwoTower`.

Both take sparse input as TorchRec's KeyedJaggedTensor does: ONE table-major CSR pair
``(indices, offsets)`` with ``len(offsets) == T * B + 1`` (T features in the model's feature
order, B samples), ``offsets[0] == 0``, ``offsets[-1] == len(indices)``. Bag ``t * B + b`` holds
the ids of feature ``t`` for sample ``b``. A ``{feature_name: (indices, offsets)}`` dict (one CSR
pair with ``B + 1`` offsets per feature) is accepted as well, in place of ``indices`` (with
``offsets`` left out). Ids are int32 or int64 tensors (numpy arrays and lists are converted).

Parameter names follow TorchRec's, so a TorchRec state dict maps over by name.

:class:`DLRM` (``torchrec.models.dlrm.DLRM``; identical names):

- ``sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight``: the tables
  (TorchRec's ``EmbeddingBagCollection``, sum pooling);
- ``dense_arch.model._mlp.<i>._linear.{weight,bias}``: the bottom MLP (``DenseArch``, ReLU after
  every layer);
- ``over_arch.model.0._mlp.<i>._linear.{weight,bias}``: the top MLP but its last layer
  (``OverArch``'s ``MLP``, ReLU after every layer);
- ``over_arch.model.1.{weight,bias}``: the top MLP's last layer, to one logit (``OverArch``'s
  final ``nn.Linear``).

One difference: fastrec's dot interaction (docs/FORMAT.md, step 3) lists the pairwise dot products
in row-major order of the STRICTLY LOWER triangle (the order of the DLRM paper's code),
TorchRec's ``InteractionArch`` in row-major order of the strictly upper triangle. The products
are the same, their order differs, so the interaction columns of the over arch's first layer are
permuted: :meth:`DLRM.load_torchrec_state_dict` does that. The sparse features must be listed in
TorchRec's ``SparseArch`` order (each table config's features, table by table).

:class:`TwoTower` (TorchRec's ``examples/retrieval`` ``TwoTower``; identical names):

- ``ebc.embedding_bags.<table>.weight``: the tables of both towers;
- ``query_proj._mlp.<i>._linear.{weight,bias}``: the user tower's MLP;
- ``candidate_proj._mlp.<i>._linear.{weight,bias}``: the item tower's MLP.

TorchRec's ``MLP`` applies a ReLU after the last layer too; fastrec's towers do not (their last
layer's activation is "none" in the manifest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["DLRM", "TwoTower"]


# --------------------------------------------------------------------------- argument parsing

def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_name(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    if not value or "." in value:
        raise ValueError(f"{what} must be a non-empty name without '.', got {value!r}")
    return value


def _parse_tables(tables) -> list[tuple[str, int, int]]:
    """``[(name, rows, dim), ...]`` (tuples, or dicts with those keys) -> validated tuples."""
    if isinstance(tables, (str, bytes, Mapping)) or not isinstance(tables, Sequence):
        raise TypeError("tables must be a list of (name, rows, dim)")
    if not tables:
        raise ValueError("tables must list at least one table")
    out, seen = [], set()
    for i, t in enumerate(tables):
        if isinstance(t, Mapping):
            try:
                t = (t["name"], t["rows"], t["dim"])
            except KeyError as exc:
                raise ValueError(f"tables[{i}] lacks the key {exc.args[0]!r}") from None
        if isinstance(t, (str, bytes)) or not isinstance(t, Sequence) or len(t) != 3:
            raise TypeError(f"tables[{i}] must be (name, rows, dim), got {t!r}")
        name = _check_name(t[0], f"tables[{i}] name")
        if name in seen:
            raise ValueError(f"table name {name!r} appears more than once")
        seen.add(name)
        out.append((name, _check_int(t[1], f"tables[{i}] rows"), _check_int(t[2], f"tables[{i}] dim")))
    return out


def _parse_features(features, table_names, what: str) -> list[tuple[str, str]]:
    """``{feature: table}``, ``[(feature, table), ...]`` or ``[name, ...]`` (feature named as its
    table) -> ``[(feature, table), ...]`` in order."""
    if isinstance(features, Mapping):
        items = list(features.items())
    elif isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
        raise TypeError(f"{what} must be a dict {{feature: table}} or a list, got {type(features).__name__}")
    else:
        items = [(f, f) if isinstance(f, str) else f for f in features]
    if not items:
        raise ValueError(f"{what} must name at least one feature")
    out, seen = [], set()
    for i, item in enumerate(items):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f"{what}[{i}] must be a name or a (feature, table) pair, got {item!r}")
        feature, table = item
        if not isinstance(feature, str) or not feature:
            raise TypeError(f"{what}[{i}]: a feature name must be a non-empty str, got {feature!r}")
        if feature in seen:
            raise ValueError(f"{what}: feature {feature!r} appears more than once")
        seen.add(feature)
        if table not in table_names:
            raise ValueError(f"{what}: feature {feature!r} uses table {table!r}, which is not in "
                             f"tables ({', '.join(table_names)})")
        out.append((feature, table))
    return out


def _parse_widths(widths, what: str, *, allow_empty: bool) -> list[int]:
    if isinstance(widths, (str, bytes, Mapping)) or not isinstance(widths, Sequence):
        raise TypeError(f"{what} must be a list of layer widths, got {type(widths).__name__}")
    if not widths and not allow_empty:
        raise ValueError(f"{what} must have at least one layer")
    return [_check_int(w, f"{what}[{i}]") for i, w in enumerate(widths)]


# --------------------------------------------------------------------------- sparse input

def _long_vector(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        a = np.asarray(x)
        x = torch.from_numpy(a if a.size else a.astype(np.int64))
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x.long()


def _table_major_from_dict(sparse: Mapping, names: Sequence[str]):
    unknown = sorted(set(sparse) - set(names))
    if unknown:
        raise ValueError(f"unknown sparse features {unknown}; the model's are {list(names)}")
    idx, offs, base, B = [], [], 0, None
    for name in names:
        if name not in sparse:
            raise ValueError(f"sparse feature {name!r} is missing")
        pair = sparse[name]
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"sparse feature {name!r} must be an (indices, offsets) pair")
        i = _long_vector(pair[0], f"indices of {name!r}")
        o = _long_vector(pair[1], f"offsets of {name!r}")
        if B is None:
            B = o.numel() - 1
        if o.numel() != B + 1:
            raise ValueError(f"offsets of {name!r} have {o.numel()} entries, expected {B + 1} "
                             "(every feature has one bag per sample)")
        if o.numel() == 0 or int(o[0]) != 0 or int(o[-1]) != i.numel():
            raise ValueError(f"offsets of {name!r} must start at 0 and end at len(indices)")
        idx.append(i)
        offs.append(o[(1 if offs else 0):] + base)
        base += i.numel()
    return torch.cat(idx), torch.cat(offs)


class _SparseInput:
    """Shared by both models: splits a table-major CSR pair and pools it through the tables."""

    def _split(self, indices, offsets, names: Sequence[str], batch_size: int | None = None):
        """-> (B, [(indices_t, offsets_t (B+1, from 0)), ...]) for the features ``names``."""
        if isinstance(indices, Mapping):
            if offsets is not None:
                raise TypeError("pass either a {feature: (indices, offsets)} dict or an "
                                "(indices, offsets) pair, not both")
            indices, offsets = _table_major_from_dict(indices, names)
        elif offsets is None:
            raise TypeError("offsets is required with a table-major indices tensor")
        indices = _long_vector(indices, "indices")
        offsets = _long_vector(offsets, "offsets")
        T = len(names)
        if offsets.numel() < 1 or (offsets.numel() - 1) % T:
            raise ValueError(f"offsets must have T * B + 1 entries for T = {T} features, got "
                             f"{offsets.numel()}")
        B = (offsets.numel() - 1) // T
        if batch_size is not None and B != batch_size:
            raise ValueError(f"offsets has {offsets.numel()} entries; expected T * B + 1 = "
                             f"{T * batch_size + 1} for T = {T} features and B = {batch_size}")
        if int(offsets[0]) != 0:
            raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
        if int(offsets[-1]) != indices.numel():
            raise ValueError(f"offsets[-1] must equal len(indices) = {indices.numel()}, got "
                             f"{int(offsets[-1])}")
        if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            p = int(torch.nonzero(offsets[1:] < offsets[:-1])[0])
            raise ValueError(f"offsets must be non-decreasing (offsets[{p + 1}] < offsets[{p}])")
        parts = []
        for t in range(T):
            o = offsets[t * B:(t + 1) * B + 1]
            start, stop = int(o[0]), int(o[-1])
            parts.append((indices[start:stop], o - start))
        return B, parts

    def _pool(self, parts, features: Sequence[tuple[str, str]]) -> list[torch.Tensor]:
        bags = self._ebc.embedding_bags
        out = []
        for (idx, off), (feature, table) in zip(parts, features):
            bag = bags[table]
            if idx.numel():
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= bag.num_embeddings:
                    bad = lo if lo < 0 else hi
                    pos = int(torch.nonzero(idx == bad)[0])
                    raise IndexError(f"feature {feature!r}: id {bad} at position {pos} is out of "
                                     f"range [0, {bag.num_embeddings}) of table {table!r}")
            device = bag.weight.device
            out.append(bag(idx.to(device), off.to(device)))
        return out


# --------------------------------------------------------------------------- building blocks

class _Perceptron(nn.Module):
    """TorchRec's ``Perceptron``: ``_linear`` then an optional ReLU."""

    def __init__(self, in_features: int, out_features: int, relu: bool):
        super().__init__()
        self._linear = nn.Linear(in_features, out_features)
        self.relu = relu

    def forward(self, x):
        x = self._linear(x)
        return torch.relu(x) if self.relu else x


class _MLP(nn.Module):
    """TorchRec's ``MLP`` layout (``_mlp.<i>._linear``); ReLU after every layer, or all but the
    last with ``last_relu=False``."""

    def __init__(self, in_features: int, widths: Sequence[int], *, last_relu: bool):
        super().__init__()
        layers, n = [], in_features
        for i, w in enumerate(widths):
            layers.append(_Perceptron(n, w, relu=last_relu or i + 1 < len(widths)))
            n = w
        self._mlp = nn.Sequential(*layers)
        self.out_features = n

    def forward(self, x):
        return self._mlp(x)

    def linears(self) -> list[nn.Linear]:
        return [p._linear for p in self._mlp]

    def activations(self) -> list[str]:
        """Each layer's activation as its forward applies it: ``"relu"`` or ``"none"`` (read
        from the ``relu`` flags, which a user may have changed after construction)."""
        return ["relu" if p.relu else "none" for p in self._mlp]


class _Bags(nn.Module):
    """A name -> ``nn.EmbeddingBag`` container. Unlike ``nn.ModuleDict`` it takes any table name,
    including those of its own methods (``items``, ``keys``, ``type``, ...): the bags live in
    ``_modules`` only and are reached with ``bags[name]``."""

    def __init__(self, bags):
        super().__init__()
        for name, bag in bags:
            self._modules[name] = bag

    def __setattr__(self, name, value):
        # nn.Module refuses a plain value under a name in _modules, and train() / eval() set
        # self.training, which may also be a table's name here.
        if name == "training":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __getitem__(self, name: str) -> nn.EmbeddingBag:
        return self._modules[name]

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


class _EmbeddingBagCollection(nn.Module):
    """TorchRec's ``EmbeddingBagCollection`` layout: ``embedding_bags.<table>`` (sum pooling; a
    bag switched to ``mode = "mean"`` or ``"max"`` is exported with that pooling)."""

    def __init__(self, tables):
        super().__init__()
        bags = []
        for name, rows, dim in tables:
            bag = nn.EmbeddingBag(rows, dim, mode="sum", include_last_offset=True)
            bound = 1.0 / math.sqrt(rows)
            nn.init.uniform_(bag.weight, -bound, bound)  # TorchRec's default initialisation
            bags.append((name, bag))
        self.embedding_bags = _Bags(bags)


class _SparseArch(nn.Module):
    def __init__(self, tables):
        super().__init__()
        self.embedding_bag_collection = _EmbeddingBagCollection(tables)


class _DenseArch(nn.Module):
    def __init__(self, in_features: int, widths):
        super().__init__()
        self.model = _MLP(in_features, widths, last_relu=True)

    def forward(self, x):
        return self.model(x)


def _lower_triangle(n: int) -> torch.Tensor:
    """Row-major (i, j), i > j, of an n x n matrix (docs/FORMAT.md step 3)."""
    return torch.tril_indices(n, n, offset=-1)


class _InteractionArch(nn.Module):
    def __init__(self, num_sparse_features: int):
        super().__init__()
        self.register_buffer("tril_indices", _lower_triangle(num_sparse_features + 1),
                             persistent=False)

    def forward(self, dense, sparse: list[torch.Tensor]):
        combined = torch.stack([dense, *sparse], dim=1)          # (B, T+1, D)
        z = torch.bmm(combined, combined.transpose(1, 2))        # (B, T+1, T+1)
        li, lj = self.tril_indices
        return torch.cat([dense, z[:, li, lj]], dim=1)


class _OverArch(nn.Module):
    """TorchRec's ``OverArch``: ``model = Sequential(MLP(widths[:-1]), Linear(..., widths[-1]))``."""

    def __init__(self, in_features: int, widths):
        super().__init__()
        mlp = _MLP(in_features, widths[:-1], last_relu=True)
        self.model = nn.Sequential(mlp, nn.Linear(mlp.out_features, widths[-1]))

    def forward(self, x):
        return self.model(x)

    def linears(self) -> list[nn.Linear]:
        return self.model[0].linears() + [self.model[1]]

    def activations(self) -> list[str]:
        """The activations after :meth:`linears`: the MLP's, then the sigmoid that
        ``DLRM.predict`` (and fastrec's runtime) applies to the last layer."""
        return self.model[0].activations() + ["sigmoid"]


# --------------------------------------------------------------------------- DLRM

class DLRM(_SparseInput, nn.Module):
    """A DLRM ranking model (docs/FORMAT.md ``kind: "dlrm"``), TorchRec's parameter names.

    Args:
        num_dense: width of the dense input.
        tables: ``[(name, rows, dim), ...]``; every ``dim`` equals ``bottom_mlp[-1]``.
        sparse_features: ``{feature: table}`` (or ``[(feature, table), ...]``, or table names
            for one feature per table); the order is the KeyedJaggedTensor key order. Several
            features may share a table.
        bottom_mlp: widths of the dense MLP (ReLU after every layer), at least one layer.
        top_mlp: widths of the over arch (ReLU between layers); the last width must be 1.

    ``forward(dense, indices, offsets)`` returns logits ``(B,)``; :meth:`predict` the
    probabilities. ``dense`` is float ``(B, num_dense)``; the sparse input is described in
    :mod:`fastrec.torch.models`.
    """

    kind = "dlrm"

    def __init__(self, num_dense, tables, sparse_features, bottom_mlp, top_mlp):
        super().__init__()
        self.num_dense = _check_int(num_dense, "num_dense")
        self.tables = _parse_tables(tables)
        names = [t[0] for t in self.tables]
        self.sparse_features = _parse_features(sparse_features, names, "sparse_features")
        self.bottom_mlp = _parse_widths(bottom_mlp, "bottom_mlp", allow_empty=False)
        self.top_mlp = _parse_widths(top_mlp, "top_mlp", allow_empty=False)
        D = self.bottom_mlp[-1]
        wrong = [(n, d) for n, _, d in self.tables if d != D]
        if wrong:
            raise ValueError(f"every table's dim must equal bottom_mlp[-1] = {D} (the dot "
                             f"interaction needs one width); got {wrong}")
        if self.top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end with width 1 (the logit), got {self.top_mlp}")
        self.embedding_dim = D
        T = len(self.sparse_features)
        self.interaction_features = D + (T + 1) * T // 2
        self.sparse_arch = _SparseArch(self.tables)
        self.dense_arch = _DenseArch(self.num_dense, self.bottom_mlp)
        self.inter_arch = _InteractionArch(T)
        self.over_arch = _OverArch(self.interaction_features, self.top_mlp)

    @property
    def _ebc(self):
        return self.sparse_arch.embedding_bag_collection

    @property
    def feature_names(self) -> list[str]:
        return [f for f, _ in self.sparse_features]

    def bottom_linears(self) -> list[nn.Linear]:
        return self.dense_arch.model.linears()

    def top_linears(self) -> list[nn.Linear]:
        return self.over_arch.linears()

    def bottom_activations(self) -> list[str]:
        return self.dense_arch.model.activations()

    def top_activations(self) -> list[str]:
        return self.over_arch.activations()

    def forward(self, dense, indices, offsets=None) -> torch.Tensor:
        if not isinstance(dense, torch.Tensor):
            dense = torch.as_tensor(np.asarray(dense))
        if not dense.is_floating_point():
            raise TypeError(f"dense must be a floating-point tensor, got {dense.dtype}")
        if dense.dim() != 2 or dense.shape[1] != self.num_dense:
            raise ValueError(f"dense must have shape (B, {self.num_dense}), got {tuple(dense.shape)}")
        weight = self.dense_arch.model.linears()[0].weight
        if callable(weight):  # torch.ao dynamic quantization turns Linear.weight into a method
            weight = next(self.sparse_arch.parameters())
        dense = dense.to(device=weight.device, dtype=weight.dtype)
        B, parts = self._split(indices, offsets, self.feature_names, dense.shape[0])
        x = self.dense_arch(dense)
        e = self._pool(parts, self.sparse_features)
        return self.over_arch(self.inter_arch(x, e)).squeeze(1)

    @torch.no_grad()
    def predict(self, dense, indices, offsets=None) -> torch.Tensor:
        """Click probabilities ``sigmoid(forward(...))``, ``(B,)``, without gradients."""
        return torch.sigmoid(self.forward(dense, indices, offsets))

    def torchrec_interaction_permutation(self) -> torch.Tensor:
        """``perm`` such that column ``D + k`` of fastrec's interaction output is column
        ``D + perm[k]`` of TorchRec's ``InteractionArch`` output."""
        n = len(self.sparse_features) + 1
        upper = torch.triu_indices(n, n, offset=1)
        pos = {(int(i), int(j)): k for k, (i, j) in enumerate(upper.t())}
        return torch.tensor([pos[(int(j), int(i))] for i, j in _lower_triangle(n).t()],
                            dtype=torch.long)

    def load_torchrec_state_dict(self, state_dict, strict: bool = True):
        """Load a ``torchrec.models.dlrm.DLRM`` state dict (same names), permuting the columns of
        the over arch's first layer from TorchRec's interaction order to fastrec's."""
        sd = dict(state_dict)
        first = self.top_linears()[0]
        key = next(k for k, p in self.named_parameters() if p is first.weight)
        if key in sd:
            w = sd[key]
            D = self.embedding_dim
            if tuple(w.shape) != tuple(first.weight.shape):
                raise ValueError(f"{key} has shape {tuple(w.shape)}, expected {tuple(first.weight.shape)}")
            perm = self.torchrec_interaction_permutation().to(w.device)
            sd[key] = torch.cat([w[:, :D], w[:, D:][:, perm]], dim=1)
        return self.load_state_dict(sd, strict=strict)


# --------------------------------------------------------------------------- two-tower

class TwoTower(_SparseInput, nn.Module):
    """A two-tower retrieval model (docs/FORMAT.md ``kind: "two_tower"``).

    Args:
        user_features / item_features: ``{feature: table}`` (or ``[(feature, table), ...]``, or
            table names) for each tower; feature names are unique across both towers, tables may
            be shared.
        tables: ``[(name, rows, dim), ...]``.
        user_mlp / item_mlp: widths of each tower's MLP (ReLU between layers, none after the
            last); empty for none. Both towers must end at the same width.
        normalize: L2-normalise both towers' vectors (scores are then cosine similarities).

    Matrix factorisation: ``TwoTower({"user_id": "users"}, {"item_id": "items"},
    [("users", U, d), ("items", I, d)])``.

    ``user_vectors(indices, offsets)`` / ``item_vectors(indices, offsets)`` take the table-major
    CSR of that tower's features; ``forward(user_indices, user_offsets, item_indices,
    item_offsets)`` returns the in-batch scores ``(B_user, B_item)``, positives on the diagonal.
    """

    kind = "two_tower"

    def __init__(self, user_features, item_features, tables, user_mlp=(), item_mlp=(),
                 normalize=True):
        super().__init__()
        self.tables = _parse_tables(tables)
        names = [t[0] for t in self.tables]
        dims = {t[0]: t[2] for t in self.tables}
        self.user_features = _parse_features(user_features, names, "user_features")
        self.item_features = _parse_features(item_features, names, "item_features")
        both = {f for f, _ in self.user_features} & {f for f, _ in self.item_features}
        if both:
            raise ValueError(f"feature names must differ between the towers; both use {sorted(both)}")
        self.user_mlp = _parse_widths(user_mlp, "user_mlp", allow_empty=True)
        self.item_mlp = _parse_widths(item_mlp, "item_mlp", allow_empty=True)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self.normalize = normalize
        self.ebc = _EmbeddingBagCollection(self.tables)
        self.query_proj = _MLP(sum(dims[t] for _, t in self.user_features), self.user_mlp,
                               last_relu=False)
        self.candidate_proj = _MLP(sum(dims[t] for _, t in self.item_features), self.item_mlp,
                                   last_relu=False)
        if self.query_proj.out_features != self.candidate_proj.out_features:
            raise ValueError(f"the towers must end at the same width: user "
                             f"{self.query_proj.out_features}, item {self.candidate_proj.out_features}")
        self.dim = self.query_proj.out_features

    @property
    def _ebc(self):
        return self.ebc

    def _tower(self, indices, offsets, features, mlp):
        _, parts = self._split(indices, offsets, [f for f, _ in features])
        return self._tower_from_parts(parts, features, mlp)

    def _tower_from_parts(self, parts, features, mlp):
        x = mlp(torch.cat(self._pool(parts, features), dim=1))
        return nn.functional.normalize(x, dim=1) if self.normalize else x

    def user_vectors(self, indices, offsets=None) -> torch.Tensor:
        """``(B, dim)`` user vectors from the user features' table-major CSR."""
        return self._tower(indices, offsets, self.user_features, self.query_proj)

    def item_vectors(self, indices, offsets=None) -> torch.Tensor:
        """``(B, dim)`` item vectors from the item features' table-major CSR."""
        return self._tower(indices, offsets, self.item_features, self.candidate_proj)

    def forward(self, user_indices, user_offsets, item_indices, item_offsets) -> torch.Tensor:
        """In-batch scores ``user_vectors @ item_vectors.T``: ``(B_user, B_item)``."""
        return self.user_vectors(user_indices, user_offsets) @ \
            self.item_vectors(item_indices, item_offsets).T
