"""What a replay reads from a trace, and the index of its trees.

The tree of every (problem, world) is indexed once into integer arrays: node ids, and the child step of each
node per model role, which the walk kernel (replay.walk) follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl

from tracestore.errors import TraceError
from tracestore.grades import graded_steps
from tracestore.schema import Manifest
from tracestore.store import Trace, empty_frame


@dataclass(frozen=True)
class TreeIndex:
    """The trees as integer arrays: node ids (positions in the sorted node keys) and step rows."""

    children: np.ndarray  # (n_roles, n_nodes): the step row continuing the node by that role, -1 if not cached
    step_parent: np.ndarray  # node each step row continues
    step_child: np.ndarray  # node each step row creates
    step_role: np.ndarray  # role index of each step row
    step_final: np.ndarray
    step_correct: np.ndarray  # False for non-final steps


class ReplayData:
    """What a replay reads from a trace: steps (no text), problems, scores and hidden states on
    demand, and an integer index of the tree nodes of every (problem, world) to replay.

    The roots replayed are every problem of ``problems`` times every world in ``worlds`` (default:
    0..W-1 for the manifest's ``worlds`` = W, else the worlds the steps hold); a root without cached
    steps is walked like any other and misses at once. ``origin`` says where the rows come from (the trace
    directory and which split of it, ``replay.artifacts.split_data``), for what is fitted on them to record.
    """

    def __init__(
        self,
        manifest: Mapping,
        steps: pl.DataFrame,
        problems: pl.DataFrame,
        *,
        scores: pl.LazyFrame | pl.DataFrame | None = None,
        hidden: pl.LazyFrame | pl.DataFrame | None = None,
        worlds: list[int] | None = None,
        origin: dict | None = None,
    ):
        self.manifest = Manifest(manifest)
        self.origin = origin
        self.roles = self.manifest.roles
        self.steps = steps.drop("text", strict=False)
        self.problems = problems
        if worlds is None:
            recorded = self.manifest.worlds
            worlds = range(recorded) if recorded is not None else sorted(self.steps["world"].unique()) or [0]
        self.worlds = [int(world) for world in worlds]
        self.scores = (scores if scores is not None else empty_frame("scores")).lazy()
        self.hidden = (hidden if hidden is not None else empty_frame("hidden")).lazy()
        self._scores_by_scorer: dict[str, pl.DataFrame] = {}

    @classmethod
    def from_trace(cls, trace: Trace, grades: str | None = None) -> ReplayData:
        """The trace's steps graded by grade set ``grades`` (default: the steps' own grades)."""
        steps = graded_steps(trace, trace.scan("steps").drop("text").collect(), grades)
        problems = trace.scan("problems").select("problem_id", "meta").collect()
        return cls(trace.manifest, steps, problems, scores=trace.scan("scores"), hidden=trace.scan("hidden"))

    def subset(self, problem_ids: list[str]) -> ReplayData:
        """The same trace restricted to ``problem_ids`` (index rebuilt lazily)."""
        keep = pl.col("problem_id").is_in(pl.Series(problem_ids, dtype=pl.String).implode())
        return ReplayData(
            self.manifest,
            self.steps.filter(keep),
            self.problems.filter(keep),
            scores=self.scores,
            hidden=self.hidden,
            worlds=self.worlds,
            origin=self.origin,
        )

    def role_index(self, role: str, router: str) -> int:
        if role not in self.roles:
            raise TraceError(
                f"router {router} needs a {role!r} model, but the trace's models are {', '.join(self.roles)}"
            )
        return self.roles.index(role)

    # ------------------------------------------------------------------ tree index

    @cached_property
    def _root_rows(self) -> pl.DataFrame:
        """One row per replayed (problem, world), problem-major."""
        return self.problems.select("problem_id").join(
            pl.DataFrame({"world": self.worlds}, schema={"world": pl.Int32}), how="cross"
        )

    @cached_property
    def _node_index(self) -> tuple[pl.DataFrame, np.ndarray]:
        """(problem_id, world, path) of every node, a node's id being its row, and the node each step row
        continues. The nodes are the roots (problem-major), then the node each step row creates (row i
        creates node n_roots + i), then parents no step row creates. Built with one hash join, not by
        sorting string keys, so it costs time linear in the steps."""
        key = ["problem_id", "world", "path"]
        world = pl.col("world").cast(pl.Int32)
        created = self.steps.select("problem_id", world, "path")
        nodes = pl.concat([self._root_rows.with_columns(path=pl.lit("", dtype=pl.String)), created])
        parents = self.steps.select("problem_id", world, path=pl.col("parent_path"))
        numbered = nodes.with_row_index("node")
        found = parents.join(numbered, on=key, how="left", maintain_order="left")
        if found.height != parents.height:  # a node stored twice: `tree` names the steps that repeat it
            first = numbered.unique(key, keep="first", maintain_order=True)
            found = parents.join(first, on=key, how="left", maintain_order="left")
        orphans = found.filter(pl.col("node").is_null()).select(key).unique(maintain_order=True)
        if orphans.height:
            numbered = orphans.with_row_index("orphan", offset=nodes.height)
            found = found.join(numbered, on=key, how="left", maintain_order="left").with_columns(
                node=pl.coalesce("node", "orphan")
            )
            nodes = pl.concat([nodes, orphans])
        return nodes, found["node"].to_numpy().astype(np.int64)

    @property
    def _nodes(self) -> pl.DataFrame:
        return self._node_index[0]

    @cached_property
    def roots(self) -> pl.DataFrame:
        """problem_id, world and root node id of every replayed (problem, world), problem-major."""
        return self._root_rows.with_columns(node=pl.int_range(pl.len(), dtype=pl.Int64))

    @cached_property
    def node_path(self) -> np.ndarray:
        """The path string of every node id."""
        return self._nodes["path"].to_numpy()

    @cached_property
    def node_path_series(self) -> pl.Series:
        """The path of every node id, as one contiguous Polars series: gathers without Python objects, several
        times faster than from the chunks of the steps the nodes share their columns with."""
        return self._nodes["path"].rechunk()

    @cached_property
    def final_values(self) -> pl.DataFrame:
        """answer and correct of every step row, contiguous: what the outcomes gather at each walk's final step."""
        return self.steps.select("answer", "correct").rechunk()

    def node_names(self, nodes: np.ndarray) -> list[str]:
        """``problem_id/world/path`` of each node (the step_id its creating step has)."""
        picked = self._nodes[np.asarray(nodes, dtype=np.int64)]
        return picked.select(pl.concat_str("problem_id", pl.col("world").cast(pl.String), "path", separator="/"))[
            :, 0
        ].to_list()

    @cached_property
    def tree(self) -> TreeIndex:
        steps = self.steps
        unknown = sorted(set(steps["model"].unique().to_list()) - set(self.roles))
        if unknown:
            raise TraceError(f"steps use model role(s) {', '.join(unknown)} that trace.json's models do not list")
        graded = steps.filter(pl.col("is_final") & pl.col("correct").is_null())
        if graded.height:
            raise TraceError(f"step {graded['step_id'][0]!r} is final but has no graded 'correct' value")
        nodes, parent = self._node_index
        role = steps["model"].replace_strict({r: i for i, r in enumerate(self.roles)}, return_dtype=pl.Int64)
        role = role.to_numpy()
        rows = np.arange(steps.height)
        children = np.full((len(self.roles), nodes.height), -1, dtype=np.int64)
        children[role, parent] = rows
        overwritten = np.flatnonzero(children[role, parent] != rows)  # a later row took the same (node, model)
        if overwritten.size:
            first = overwritten[0]
            ids = steps["step_id"].gather([first, children[role[first], parent[first]]]).to_list()
            raise TraceError(f"steps {ids[0]!r} and {ids[1]!r} continue the same node with the same model")
        return TreeIndex(
            children=children,
            step_parent=parent,
            step_child=self._root_rows.height + rows,
            step_role=role,
            step_final=steps["is_final"].to_numpy(),
            step_correct=steps["correct"].fill_null(False).to_numpy(),
        )

    # ------------------------------------------------------------------ scores

    def scores_of(self, scorer: str) -> pl.DataFrame:
        """The scores of ``scorer`` aligned to the step rows: value, detail, n_tokens_processed (null where
        the step has no score)."""
        if scorer not in self._scores_by_scorer:
            rows = (
                self.scores.filter(pl.col("scorer") == scorer)
                .select("step_id", "value", "detail", "n_tokens_processed")
                .collect()
            )
            twice = rows.filter(pl.col("step_id").is_duplicated())
            if twice.height:
                raise TraceError(f"step {twice['step_id'][0]!r} has more than one {scorer!r} score")
            aligned = self.steps.select("step_id").join(rows, on="step_id", how="left", maintain_order="left")
            self._scores_by_scorer[scorer] = aligned.drop("step_id")
        return self._scores_by_scorer[scorer]
