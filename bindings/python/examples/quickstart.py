"""fleetlink quickstart: an embedded server, three trucks sending telemetry, and the fleet's
telemetry as Arrow, aggregated with polars.

    python examples/quickstart.py

Needs fleetlink and polars (pip install ./bindings/python polars).
"""

import datetime as dt

import polars as pl

import fleetlink

START = dt.datetime(2024, 5, 1, 8, 0, tzinfo=dt.timezone.utc)

with fleetlink.Server() as server:  # a temporary data dir, removed when it stops
    client = fleetlink.connect(server.url, server.admin_token, ca=server.ca_cert)

    trucks = []
    for n, region in enumerate(["north", "north", "south"], start=1):
        creds = client.provision(f"truck-{n}", tags={"region": region})
        trucks.append(fleetlink.Device.connect(**creds))

    # ten minutes of readings, one a minute per truck
    for minute in range(10):
        at = START + dt.timedelta(minutes=minute)
        for n, truck in enumerate(trucks, start=1):
            truck.send(
                {
                    "speed_kmh": 40.0 + 10 * n + minute,
                    "fuel": round(1.0 - 0.02 * n * minute, 2),
                    "pos": (52.0 + n / 100, 4.0 + minute / 100),
                },
                ts=at,
            )
    for truck in trucks:
        truck.flush()  # everything sent is stored

    table = client.telemetry(metrics=["speed_kmh", "fuel"], start=START, end=START + dt.timedelta(hours=1))
    print(f"telemetry: {table.num_rows} rows, columns {table.column_names}")

    # join the tags from the fleet table, then aggregate per region with polars
    fleet = pl.from_arrow(client.fleet_table()).select("id", pl.col("tag.region").alias("region"))
    readings = pl.from_arrow(table).join(fleet, left_on="device", right_on="id")
    summary = (
        readings.pivot(on="metric", index=["device", "region", "time"], values="value")
        .group_by("region")
        .agg(
            pl.col("device").n_unique().alias("trucks"),
            pl.col("speed_kmh").mean().round(1).alias("mean_speed_kmh"),
            pl.col("fuel").min().alias("lowest_fuel"),
        )
        .sort("region")
    )
    print(summary)

    # the server can downsample too: 5-minute maxima of one truck
    print(client.telemetry("truck-1", "speed_kmh", every="5m", agg="max").to_pandas()[["time", "value"]])

    for truck in trucks:
        truck.close()
    client.close()
