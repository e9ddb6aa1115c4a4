"""A training run's MRML plots (no Qt): :class:`RunPlots` keeps a table node (one row per
epoch) and two plot charts (losses, validation Dice) up to date from a
:class:`~MTKDLib.run_monitor.RunState`, appending only the new rows; re-attaching to a run takes
its nodes over. :func:`plot_view_node`: the plot view node a plot widget shows them in, one per
widget. Runs against a headless ``slicer-core`` scene in the tests.
"""

from __future__ import annotations

import math
from typing import Any

from MTKDLib.run_monitor import NOT_TERMS, RunState, as_number, is_number

# ------------------------------------------------------------------------- MRML
# Colours of the plot series, in order (Slicer's plots cycle nothing by themselves).
PALETTE = (
    (0.12, 0.47, 0.71),
    (1.00, 0.50, 0.05),
    (0.17, 0.63, 0.17),
    (0.84, 0.15, 0.16),
    (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29),
    (0.89, 0.47, 0.76),
    (0.50, 0.50, 0.50),
    (0.74, 0.74, 0.13),
    (0.09, 0.75, 0.81),
)
EPOCH_COLUMN = "epoch"
VAL_SERIES = ("val_dice",)


RUN_ATTRIBUTE = "MTKD.run"  # the run a plot node shows (its run folder)
ROLE_ATTRIBUTE = "MTKD.plot"  # "table", "losses", "validation" or "series"
COLUMN_ATTRIBUTE = "MTKD.column"  # the table column a series node draws
PLOT_VIEW_OWNER = "MTKD.PlotViews"  # singleton tag of the node that owns the plot views


def _nodes_by_class(scene: Any, class_name: str) -> list[Any]:
    return [
        scene.GetNthNodeByClass(i, class_name)
        for i in range(scene.GetNumberOfNodesByClass(class_name))
    ]


def _run_node(scene: Any, class_name: str, key: str, role: str, column: str | None = None):
    """The node of ``class_name`` a :class:`RunPlots` for run ``key`` added before, or None."""
    for node in _nodes_by_class(scene, class_name):
        if (
            node.GetAttribute(RUN_ATTRIBUTE) == key
            and node.GetAttribute(ROLE_ATTRIBUTE) == role
            and (column is None or node.GetAttribute(COLUMN_ATTRIBUTE) == column)
        ):
            return node
    return None


def _singleton(scene: Any, class_name: str, tag: str, name: str) -> Any:
    """The node of ``class_name`` with singleton tag ``tag``; added when the scene has none."""
    node = scene.GetSingletonNode(tag, class_name)
    if node is None:
        node = scene.CreateNodeByClass(class_name)
        node.UnRegister(None)  # CreateNodeByClass added a reference the variable owns already
        node.SetSingletonTag(tag)
        node.SetName(name)
        node = scene.AddNode(node)
    return node


def plot_view_node(scene: Any, tag: str, chart: Any | None = None) -> Any:
    """The ``vtkMRMLPlotViewNode`` of the plot widget known by ``tag`` (unique per widget):
    created the first time, the same node afterwards (a singleton, so a saved and reloaded
    scene or a closed one keeps one per widget). A ``qMRMLPlotWidget`` makes none itself; give
    this one to its ``setMRMLPlotViewNode``. Its parent layout node is a hidden owner node, as
    for views shown outside the view layout (Slicer's script repository, "Show a 3D view
    outside the view layout"), so the layout manager leaves it alone. Shows ``chart`` (a
    ``vtkMRMLPlotChartNode``) when given.
    """
    owner = _singleton(scene, "vtkMRMLScriptedModuleNode", PLOT_VIEW_OWNER, "MTKD plot views")
    owner.SetHideFromEditors(True)
    view = _singleton(scene, "vtkMRMLPlotViewNode", tag, f"{tag} view")
    if view.GetLayoutName() != tag:
        view.SetLayoutName(tag)
    if view.GetParentLayoutNode() is not owner:
        view.SetAndObserveParentLayoutNodeID(owner.GetID())
    if chart is not None and view.GetPlotChartNodeID() != chart.GetID():
        view.SetPlotChartNodeID(chart.GetID())
    return view


class RunPlots:
    """A run's history as MRML: a table node (one row per epoch; columns ``epoch``, each loss
    term, each validation metric, NaN where an epoch has no value) and two plot charts,
    ``"<name> losses"`` (a series per loss term) and ``"<name> validation Dice"``.

    ``key`` (default ``name``; the run folder where names can repeat) identifies the run: the
    nodes a :class:`RunPlots` of the same key left in the scene are taken over (re-attaching
    to a run adds no nodes); the others are created here. :meth:`update` appends the new epochs
    only (and adds the columns and series of terms that appear later), and returns at once
    when nothing changed. A history that was rewritten (a new run in the folder, a resume that
    repeated epochs) is rebuilt in the same nodes; series of terms the run no longer has are
    removed. :meth:`remove` takes the nodes out of the scene.
    """

    def __init__(self, scene: Any, name: str, key: str | None = None):
        self.scene = scene
        self.name = name
        self.key = key or name
        self.table = self._node("vtkMRMLTableNode", "table", f"{name} history")
        self.loss_chart = self._node("vtkMRMLPlotChartNode", "losses", f"{name} losses")
        self.val_chart = self._node("vtkMRMLPlotChartNode", "validation", f"{name} validation Dice")
        self.loss_chart.SetTitle(f"{name}: training losses")
        self.loss_chart.SetXAxisTitle("epoch")
        self.loss_chart.SetYAxisTitle("loss")
        self.val_chart.SetTitle(f"{name}: validation Dice")
        self.val_chart.SetXAxisTitle("epoch")
        self.val_chart.SetYAxisTitle("Dice")
        self.series: dict[str, Any] = {}  # column name -> its plot series node
        for chart in (self.loss_chart, self.val_chart):
            for index in range(chart.GetNumberOfPlotSeriesNodes()):
                series = chart.GetNthPlotSeriesNode(index)
                column = series.GetAttribute(COLUMN_ATTRIBUTE) if series else None
                if column and series.GetAttribute(RUN_ATTRIBUTE) == self.key:
                    self.series[column] = series
        self._written: list[dict] = []  # the records in the table, in order
        self._generation: int | None = None
        self._clear()

    def _node(self, class_name: str, role: str, name: str) -> Any:
        node = _run_node(self.scene, class_name, self.key, role)
        if node is None:
            node = self.scene.AddNewNodeByClass(class_name, name)
            node.SetAttribute(RUN_ATTRIBUTE, self.key)
            node.SetAttribute(ROLE_ATTRIBUTE, role)
        return node

    def nodes(self) -> tuple[Any, Any, Any]:
        """(table node, losses chart node, validation Dice chart node)."""
        return self.table, self.loss_chart, self.val_chart

    @property
    def columns(self) -> list[str]:
        table = self.table.GetTable()
        return [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]

    def update(self, state: RunState) -> bool:
        """Bring the nodes up to ``state.history``; whether anything changed."""
        history = state.history
        written = self._written
        same_run = state.generation == self._generation
        if (
            same_run
            and len(history) == len(written)
            and (not written or history[-1] is written[-1])
        ):
            return False
        same_rows = (
            same_run
            and len(history) >= len(written)
            and all(a is b or a == b for a, b in zip(history, written))
        )
        if same_rows:
            written[:] = history[: len(written)]  # equal records: compare by identity next time
        else:
            self._clear()
        self._generation = state.generation
        new = history[len(self._written) :]
        if not new:
            self._sync_series()
            return not same_rows
        import vtk

        table = self.table.GetTable()
        was_modifying = self.table.StartModify()
        rows = table.GetNumberOfRows()
        names = [*state.loss_terms, *state.val_metrics]
        names += [k for r in new for k in r if is_number(r[k]) and k not in NOT_TERMS]
        for name in dict.fromkeys(names):
            if table.GetColumnByName(name) is None:
                column = vtk.vtkDoubleArray()
                column.SetName(name)
                for _ in range(rows):
                    column.InsertNextValue(math.nan)
                table.AddColumn(column)
        columns = [table.GetColumn(i) for i in range(table.GetNumberOfColumns())]
        for record in new:
            for column in columns:
                column.InsertNextValue(as_number(record.get(column.GetName())))
        for column in columns:
            column.Modified()
        table.Modified()
        self._written.extend(new)
        self.table.Modified()
        self.table.EndModify(was_modifying)
        self._sync_series()
        return True

    def _sync_series(self) -> None:
        """One series per plotted column of the table: those of columns the table no longer
        has are removed, the missing ones added."""
        columns = self.columns[1:]
        for name in [name for name in self.series if name not in columns]:
            self._remove_series(self.series.pop(name))
        for name in columns:
            if name in self.series:
                continue
            if name.startswith("val_"):
                if name in VAL_SERIES:
                    self._add_series(name, self.val_chart)
            else:
                self._add_series(name, self.loss_chart)

    def _add_series(self, column: str, chart: Any) -> None:
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {column}")
        series.SetAttribute(RUN_ATTRIBUTE, self.key)
        series.SetAttribute(ROLE_ATTRIBUTE, "series")
        series.SetAttribute(COLUMN_ATTRIBUTE, column)
        series.SetAndObserveTableNodeID(self.table.GetID())
        series.SetXColumnName(EPOCH_COLUMN)
        series.SetYColumnName(column)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetLineStyle(series.LineStyleSolid)
        series.SetColor(*PALETTE[chart.GetNumberOfPlotSeriesNodes() % len(PALETTE)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.series[column] = series

    def _remove_series(self, series: Any) -> None:
        for chart in (self.loss_chart, self.val_chart):
            chart.RemovePlotSeriesNodeID(series.GetID())
        if series.GetScene() is not None:
            self.scene.RemoveNode(series)

    def _clear(self) -> None:
        """An empty table with only the epoch column (the series stay until
        :meth:`_sync_series` knows the new columns)."""
        import vtk

        table = self.table.GetTable()
        was_modifying = self.table.StartModify()
        while table.GetNumberOfColumns():
            table.RemoveColumn(table.GetNumberOfColumns() - 1)
        epoch = vtk.vtkDoubleArray()
        epoch.SetName(EPOCH_COLUMN)
        table.AddColumn(epoch)
        table.Modified()
        self.table.Modified()
        self.table.EndModify(was_modifying)
        self._written = []

    def remove(self) -> None:
        """Take the table, charts and series out of the scene."""
        for node in [*self.series.values(), *self.nodes()]:
            if node.GetScene() is not None:
                self.scene.RemoveNode(node)
        self.series = {}


__all__ = ["RunPlots", "plot_view_node"]
