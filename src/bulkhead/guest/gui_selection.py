"""The qube's CLIPBOARD selection, for dom0's Ctrl+Shift+C and Ctrl+Shift+V.

A mixin of the GUI agent (:class:`bulkhead_guest.gui_agent.Agent`): on
``D_CLIP_REQUEST`` it fetches the qube's clipboard (its TARGETS, then a PNG if
offered, else UTF-8 text) and sends it as ``G_CLIPBOARD``; a ``D_CLIP_DATA``
makes the agent the CLIPBOARD owner, serving what dom0 pasted.  Data is opaque
bytes with its kind, within ``CLIPBOARD_MAX``.
"""

import time

from . import gui_protocol as G


class SelectionMixin:
    def clip_fetch(self):
        a = self.atoms
        if self.clip_owned is not None:   # our own (pasted) clipboard
            kind, data = self.clip_owned
            self.send(G.G_CLIPBOARD, 0, bytes([kind]) + data)
            return
        owner = self.d.get_selection_owner(a["CLIPBOARD"])
        if not owner:
            self.send(G.G_CLIPBOARD, 0, bytes([G.CLIP_TEXT]))
            return
        self.clip_pending = "targets"
        self.clip_deadline = time.monotonic() + 2.0
        self.helper.convert_selection(a["CLIPBOARD"], a["TARGETS"], a["BULKHEAD_CLIP"], self.X.CurrentTime)

    def clip_timeout(self):
        if self.clip_pending and time.monotonic() > self.clip_deadline:
            self.clip_pending = None
            self.send(G.G_CLIPBOARD, 0, bytes([G.CLIP_TEXT]))

    def selection_notify(self, ev):
        a = self.atoms
        if self.clip_pending is None:
            return
        prop = None
        if ev.property != self.X.NONE:
            prop = self.helper.get_full_property(a["BULKHEAD_CLIP"], self.X.AnyPropertyType,
                                                 G.CLIPBOARD_MAX)
        if self.clip_pending == "targets":
            targets = list(prop.value) if prop is not None and prop.format == 32 else []
            self.clip_pending = "png" if a["image/png"] in targets else "text"
            target = a["image/png"] if self.clip_pending == "png" else a["UTF8_STRING"]
            self.helper.convert_selection(a["CLIPBOARD"], target, a["BULKHEAD_CLIP"], self.X.CurrentTime)
            return
        kind = G.CLIP_PNG if self.clip_pending == "png" else G.CLIP_TEXT
        self.clip_pending = None
        data = b""
        if prop is not None and prop.property_type != a["INCR"]:
            v = prop.value
            data = v if isinstance(v, bytes) else (v.encode() if isinstance(v, str) else bytes(v))
        self.send(G.G_CLIPBOARD, 0, bytes([kind]) + data[:G.CLIPBOARD_MAX])

    def selection_request(self, ev):
        from Xlib import Xatom  # noqa: PLC0415
        from Xlib.protocol import event  # noqa: PLC0415
        a = self.atoms
        X = self.X
        prop = ev.property if ev.property != X.NONE else ev.target
        ok = False
        if self.clip_owned is not None and ev.selection == a["CLIPBOARD"]:
            kind, data = self.clip_owned
            if ev.target == a["TARGETS"]:
                targets = [a["TARGETS"]] + ([a["image/png"]] if kind == G.CLIP_PNG else
                                            [a["UTF8_STRING"], a["STRING"], a["TEXT"]])
                ev.requestor.change_property(prop, Xatom.ATOM, 32, targets)
                ok = True
            elif kind == G.CLIP_PNG and ev.target == a["image/png"]:
                ev.requestor.change_property(prop, a["image/png"], 8, data)
                ok = True
            elif kind == G.CLIP_TEXT and ev.target in (a["UTF8_STRING"], a["STRING"], a["TEXT"]):
                ev.requestor.change_property(prop, a["UTF8_STRING"], 8, data)
                ok = True
        reply = event.SelectionNotify(time=ev.time, requestor=ev.requestor, selection=ev.selection,
                                      target=ev.target, property=prop if ok else X.NONE)
        ev.requestor.send_event(reply)
