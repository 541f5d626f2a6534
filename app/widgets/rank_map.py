"""The rank map: an adaptive-rank (AdaLoRA) run's kept ranks as a layer x projection heatmap, one cell per adapted
projection, 0 (pruned) white to the initial rank dark blue; a cell's tooltip names it and its rank, and a legend
under the grid gives the scale. It paints what it is given (StepEvent.rank_map), nothing else."""
from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, QSize, Qt
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import QToolTip, QWidget

LOW, HIGH = QColor("#f7fbff"), QColor("#08306b")    # rank 0 and the initial rank (matplotlib's Blues ends)
LABEL_W, HEADER_H, LEGEND_H = 34, 18, 26            # pixels: layer numbers, projection names, legend strip


def cell_color(rank: int, top: int) -> QColor:
    """The colour of `rank` on a scale that ends at `top` (the initial rank): linear from LOW to HIGH."""
    t = 0.0 if top <= 0 else min(max(rank / top, 0.0), 1.0)
    return QColor.fromRgbF(*(LOW.getRgbF()[i] + t * (HIGH.getRgbF()[i] - LOW.getRgbF()[i]) for i in range(3)))


class RankMap(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent, objectName="rank-map")
        self.setMouseTracking(True)
        self.setMinimumSize(180, 120)
        self.targets: tuple[str, ...] = ()
        self.ranks: tuple[tuple[int, ...], ...] = ()   # [layer][target], as StepEvent.rank_map
        self.top = 1                                    # the scale's end: the initial rank

    def reset(self, targets: tuple[str, ...], initial_rank: int) -> None:
        self.targets, self.top, self.ranks = tuple(targets), max(1, initial_rank), ()
        self.setToolTip("")
        self.update()

    def set_ranks(self, ranks) -> None:
        self.ranks = tuple(tuple(int(r) for r in row) for row in ranks)
        self.update()

    def sizeHint(self) -> QSize:
        return QSize(LABEL_W + 48 * max(1, len(self.targets)), HEADER_H + LEGEND_H + 10 * max(8, len(self.ranks)))

    # -- geometry: one function, used by painting and tooltips alike ----------------------------------------------
    def _grid(self) -> QRect:
        return QRect(LABEL_W, HEADER_H, max(1, self.width() - LABEL_W - 4),
                     max(1, self.height() - HEADER_H - LEGEND_H))

    def cell_rect(self, layer: int, column: int) -> QRect:
        grid, rows, cols = self._grid(), max(1, len(self.ranks)), max(1, len(self.targets))
        x0, x1 = grid.left() + grid.width() * column // cols, grid.left() + grid.width() * (column + 1) // cols
        y0, y1 = grid.top() + grid.height() * layer // rows, grid.top() + grid.height() * (layer + 1) // rows
        return QRect(x0, y0, x1 - x0, y1 - y0)

    def cell_at(self, pos: QPoint) -> tuple[int, int] | None:
        """(layer, target column) under `pos`, or None outside the cells."""
        grid = self._grid()
        if not self.ranks or not self.targets or not grid.contains(pos):
            return None
        layer = (pos.y() - grid.top()) * len(self.ranks) // grid.height()
        column = (pos.x() - grid.left()) * len(self.targets) // grid.width()
        return min(layer, len(self.ranks) - 1), min(column, len(self.targets) - 1)

    def describe(self, layer: int, column: int) -> str:
        rank = self.ranks[layer][column]
        return (f"layer {layer}, {self.targets[column]}: rank {rank} of {self.top}"
                + (" (pruned: no adapter)" if rank == 0 else ""))

    # -- Qt ------------------------------------------------------------------------------------------------------
    def event(self, e) -> bool:
        if e.type() == e.Type.ToolTip:
            cell = self.cell_at(e.pos())
            if cell is None:
                QToolTip.hideText()
            else:
                QToolTip.showText(e.globalPos(), self.describe(*cell), self)
            return True
        return super().event(e)

    def paintEvent(self, _event) -> None:
        p = QPainter(self)
        p.fillRect(self.rect(), self.palette().window())
        if not self.targets:
            return
        p.setPen(self.palette().windowText().color())
        for column, target in enumerate(self.targets):
            head = self.cell_rect(0, column)
            p.drawText(QRect(head.left(), 0, head.width(), HEADER_H), Qt.AlignCenter,
                       target.removesuffix("_proj"))
        every = max(1, len(self.ranks) // 8)     # a layer number on every few rows, so they stay legible
        for layer, row in enumerate(self.ranks):
            for column, rank in enumerate(row):
                cell = self.cell_rect(layer, column)
                p.fillRect(cell.adjusted(0, 0, -1, -1), cell_color(rank, self.top))
                if cell.height() >= 14 and cell.width() >= 18:
                    p.setPen(QColor("white") if rank > self.top / 2 else QColor("black"))
                    p.drawText(cell, Qt.AlignCenter, str(rank))
            if layer % every == 0:
                p.setPen(self.palette().windowText().color())
                row_rect = self.cell_rect(layer, 0)
                p.drawText(QRect(0, row_rect.top(), LABEL_W - 4, row_rect.height()),
                           Qt.AlignRight | Qt.AlignVCenter, str(layer))
        self._paint_legend(p)

    def _paint_legend(self, p: QPainter) -> None:
        """A strip from rank 0 to the initial rank under the grid, its ends labelled."""
        y, left = self.height() - LEGEND_H + 6, LABEL_W + 24
        width = max(40, self.width() - left - 36)
        steps = min(self.top, 24) + 1
        for i in range(steps):
            rank = round(i * self.top / (steps - 1))
            x0, x1 = left + width * i // steps, left + width * (i + 1) // steps
            p.fillRect(QRect(x0, y, x1 - x0, 10), cell_color(rank, self.top))
        p.setPen(self.palette().windowText().color())
        p.drawText(QRect(0, y - 3, left - 4, 16), Qt.AlignRight | Qt.AlignVCenter, "rank 0")
        p.drawText(QRect(left + width + 4, y - 3, 32, 16), Qt.AlignLeft | Qt.AlignVCenter, str(self.top))
