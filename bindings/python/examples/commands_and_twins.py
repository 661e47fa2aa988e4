"""Commands and twins: a device with a command handler and a desired-state callback; an operator
runs a command, sets desired state and watches the device catch up.

    python examples/commands_and_twins.py
"""

import queue

import fleetlink

with fleetlink.Server() as server:
    operator = fleetlink.connect(server.url, server.admin_token, ca=server.ca_cert)
    pump = fleetlink.Device.connect(**operator.provision("pump-7", tags={"site": "plant-a"}))

    # -- the device side --------------------------------------------------------------------
    pump.report({"mode": "normal", "fw": "1.4.2"})

    @pump.command("set_rpm")
    def set_rpm(args):
        if not 0 < args["rpm"] <= 3000:
            raise ValueError(f"rpm {args['rpm']} is out of range 1..3000")
        return {"rpm": args["rpm"], "ok": True}

    applied = queue.Queue()

    def on_desired(state):
        # called now and on every change of the desired twin; apply what differs, report it
        if state["delta"]:
            pump.report(state["delta"])
            applied.put(state["delta"])

    pump.on_desired(on_desired)

    # -- the operator side ------------------------------------------------------------------
    print("set_rpm ->", operator.command("pump-7", "set_rpm", {"rpm": 1200}, timeout=5))
    try:
        operator.command("pump-7", "set_rpm", {"rpm": 9000}, timeout=5)
    except fleetlink.CommandFailed as e:
        print(f"set_rpm failed: state={e.state} error={e.error!r}")
    try:
        operator.command("pump-7", "self_destruct", timeout=5)
    except fleetlink.CommandFailed as e:
        print(f"self_destruct: state={e.state}")

    twin = operator.set_desired("pump-7", {"mode": "eco"})
    print("delta after set_desired:", twin["delta"])
    print("the device applied:", applied.get(timeout=5))
    print("twin now:", {k: operator.twin("pump-7")[k] for k in ("reported", "desired", "delta")})

    # optimistic concurrency: a stale version is refused
    version = operator.twin("pump-7")["desired_version"]
    operator.set_desired("pump-7", {"mode": "boost"}, version=version)
    print("the device applied:", applied.get(timeout=5))
    try:
        operator.set_desired("pump-7", {"mode": "off"}, version=version)
    except fleetlink.Conflict as e:
        print("stale version refused:", e)

    print("commands:", [(c["name"], c["state"]) for c in operator.commands("pump-7")])

    pump.close()
    operator.close()
