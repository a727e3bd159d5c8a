"""The napari dock widget: pick a 3D image layer, check its channel and spacing, fuse it in a worker thread.

The fusion (:class:`fusemycells.napari.fusion.FusionEngine`) runs in ``napari.qt.threading``'s worker; its
progress reaches the bar through a Qt signal (queued to the GUI thread); Cancel stops it at the next patch
batch or output slab and adds no layer. A layer that cannot be fused gets a message in the widget's status
line, not a traceback.
"""

from __future__ import annotations

from typing import Any

from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, Label, ProgressBar, PushButton
from qtpy.QtCore import QObject, Signal

from fusemycells.napari.fusion import (
    DEVICES,
    FusionEngine,
    FusionRequest,
    LayerError,
    Listener,
    Outcome,
    chosen_spacing,
    guess_channel,
    volume_of,
)


class _Relay(QObject):
    """Carries the worker thread's progress to the GUI thread (a signal emitted in another thread is queued)."""

    progressed = Signal(str, float)


class FuseWidget(Container):
    """Fuse the chosen 3D image layer; adds ``'<layer> fused (<channel>, FuseMyCells)'`` with the layer's scale,
    and optionally the network weight map over the same extent. ``engine``: where the weights come from
    (default: the bundled ones, as the command line)."""

    def __init__(self, napari_viewer: Any, engine: FusionEngine | None = None) -> None:
        super().__init__(labels=True)
        self.viewer, self.engine = napari_viewer, engine or FusionEngine()
        channels = self.engine.channels()
        self.layer = ComboBox(label="image (3D)", choices=self._image_layers)
        self.channel = ComboBox(label="channel", choices=channels, value=channels[0])
        self.spacing = [
            FloatSpinBox(label=f"spacing {axis} (µm)", min=1e-4, max=1e4, step=1e-4, value=1.0) for axis in "zyx"
        ]
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.budget = FloatSpinBox(label="time budget (s)", min=1.0, max=86400.0, step=1.0)
        self.budget.value = self.engine.time_budget_s()
        self.show_weight = CheckBox(text="add the network weight map", value=True)
        self.run_button = PushButton(text="Fuse")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=100, value=0)
        self.status = Label(label="status", value="pick a 3D image layer")
        self.extend([self.layer, self.channel, *self.spacing, self.device, self.budget, self.show_weight])
        self.extend([self.run_button, self.cancel_button, self.progress, self.status])
        self.worker: Any = None
        self.listener: Listener | None = None
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self.layer.changed.connect(self._on_layer)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda _event=None: self.layer.reset_choices())
        self.layer.reset_choices()
        self._on_layer(self.layer.value)

    def _image_layers(self, _widget: Any = None) -> list[Any]:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _on_layer(self, layer: Any) -> None:
        """Fill the spacing from the layer's scale (its last three axes) and guess the channel."""
        if layer is None:
            return
        for box, value in zip(self.spacing, list(layer.scale)[-3:]):
            box.value = float(value)
        self.channel.value = guess_channel(layer.name, dict(layer.metadata), tuple(self.channel.choices))

    def request(self) -> FusionRequest:
        """The fusion the fields ask for, or :class:`LayerError` saying what is wrong with them."""
        layer = self.layer.value
        if layer is None:
            raise LayerError("no image layer: open a 3D stack first")
        data = volume_of(layer.data, rgb=bool(layer.rgb), multiscale=bool(layer.multiscale))
        decimals = self.spacing[0].native.decimals()
        spacing = chosen_spacing([box.value for box in self.spacing], layer.scale, decimals)
        return FusionRequest(data, spacing, self.channel.value, self.device.value, float(self.budget.value), layer.name)

    def start(self) -> None:
        """Check the fields and start the fusion in a worker thread (the status says why when it cannot)."""
        if self.worker is not None:
            return
        try:
            request = self.request()
        except LayerError as exc:
            self.status.value = f"cannot fuse: {exc}"
            return
        from napari.qt.threading import create_worker

        self.listener = Listener(self._relay.progressed.emit)
        self.worker = create_worker(self.engine.run, request, self.listener, _start_thread=False)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._on_finished)
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.progress.value = 0
        self.status.value = f"fusing {request.name} ({request.channel}, {request.device})"
        self.worker.start()

    def cancel(self) -> None:
        """Ask the running fusion to stop (at its next patch batch or output slab); no layer is added."""
        if self.listener is not None:
            self.listener.cancel.set()
            self.status.value = "cancelling"

    def _on_progress(self, text: str, fraction: float) -> None:
        self.progress.value = int(round(100 * fraction))
        if self.listener is not None and not self.listener.cancel.is_set():
            self.status.value = text

    def _on_returned(self, outcome: Outcome) -> None:
        result = outcome.result
        if outcome.error is not None:
            self.status.value = f"fusion failed: {outcome.error}"
            return
        if result is None:
            self.status.value = "cancelled: no layer added"
            return
        for data, kwargs, _kind in result.layers(with_weight=bool(self.show_weight.value)):
            self.viewer.add_image(data, **kwargs)
        self.progress.value = 100
        self.status.value = result.summary()

    def _on_finished(self) -> None:
        self.worker, self.listener = None, None
        self.run_button.enabled, self.cancel_button.enabled = True, False
