#!/usr/bin/env python3
"""Serve meter register images with pymodbus, a Modbus stack we did not write.

Used by tests/interop_probe.rs: the Rust test encodes known values with a
facwatch profile into a JSON register image, this script serves it, and the
gateway's `probe` must read the same values back.

Usage:
    pymodbus_meters.py IMAGE.json tcp PORT            # Modbus TCP on 127.0.0.1:PORT
    pymodbus_meters.py IMAGE.json rtu DEVICE [BAUD]   # Modbus RTU on a serial device
    pymodbus_meters.py --check                        # is the installed pymodbus usable?

IMAGE.json: {"units": {"1": {"holding": {"8198": 17249, ...},
                             "input":   {"0": 17254, ...}}}}
Keys of "holding" (FC03) and "input" (FC04) are PDU register addresses
(0-based, as on the wire), values are 16-bit words.

Behaviour:
- Prints exactly one line `READY` on stdout once it listens (TCP) or has
  opened the device (RTU); everything else goes to stderr. Readers must look
  for that line, not parse all of stdout.
- Each table of a unit is served as one contiguous block from its lowest to
  its highest given address; registers in between that the image does not
  give read as 0. Registers outside the block, and a table the image does
  not give, answer exception 02 (illegal data address). A unit not in
  the image gets exception 04 from pymodbus 3.16.1 (its SimCore raises
  KeyError for an unknown id, so `ignore_missing_devices` does not apply);
  the tests address only units of the image.
- Runs until killed (SIGTERM/SIGINT).

pymodbus API (checked against the installed 3.16.1 source): servers take a
list of `pymodbus.simulator.SimDevice(id=UNIT, simdata=(coils, discrete
inputs, holding, input))`, each a list of `SimData(address, values=[...],
datatype=DataType.REGISTERS)`. SimData addresses are PDU addresses: the word
`values[i]` answers a request for register `address + i`, with no +1 offset.
(The older `ModbusSequentialDataBlock(1, values)` maps `values[i]` to
register `i` as well: in 3.16.1 it wraps `SimData(address - 1, ...)`. It is
deprecated there and logs a warning on every start, hence SimDevice.)
Addresses a SimDevice does not define answer exception 02. `--check` looks
for this API rather than a version number; .ci/run installs ~=3.16.1.
"""

import asyncio
import json
import signal
import sys

def fail(message):
    print(f"pymodbus_meters.py: {message}", file=sys.stderr)
    sys.exit(2)


def import_pymodbus():
    try:
        import pymodbus
        from pymodbus.simulator import DataType, SimData, SimDevice
    except ImportError as e:
        fail(
            "needs pymodbus with the SimDevice API "
            f"(pip install 'pymodbus[serial]~=3.16.1'): {e}"
        )
    return pymodbus, DataType, SimData, SimDevice


def block(words, DataType, SimData):
    """One contiguous SimData block covering every address in `words`."""
    if not words:
        # SimDevice needs a non-empty list per table: one invalid register
        # at 0 answers exception 02 like the rest of the undefined space.
        return [SimData(0, count=1, datatype=DataType.INVALID)]
    low, high = min(words), max(words)
    values = [words.get(address, 0) for address in range(low, high + 1)]
    return [SimData(low, values=values, datatype=DataType.REGISTERS)]


def table(unit, section, image):
    raw = image.get(section, {})
    if not isinstance(raw, dict):
        fail(f"units.{unit}.{section} must be an object of address: word")
    words = {}
    for key, word in raw.items():
        try:
            address = int(key)
        except ValueError:
            fail(f"units.{unit}.{section}: `{key}` is not a register address")
        if not 0 <= address <= 0xFFFF:
            fail(f"units.{unit}.{section}: address {address} is outside 0..65535")
        if not isinstance(word, int) or not 0 <= word <= 0xFFFF:
            fail(f"units.{unit}.{section}.{key}: {word!r} is not a 16-bit word")
        words[address] = word
    return words


def devices(path, DataType, SimData, SimDevice):
    try:
        with open(path, encoding="utf-8") as f:
            image = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read register image {path}: {e}")
    units = image.get("units") if isinstance(image, dict) else None
    if not isinstance(units, dict) or not units:
        fail(f"{path}: needs a non-empty object `units`")
    out = []
    for key, tables in units.items():
        try:
            unit = int(key)
        except ValueError:
            fail(f"{path}: unit `{key}` is not a number")
        if not 1 <= unit <= 247:
            fail(f"{path}: unit {unit} is outside 1..247")
        if not isinstance(tables, dict) or set(tables) - {"holding", "input"}:
            fail(f"{path}: units.{key} may only have `holding` and `input`")
        holding = table(key, "holding", tables)
        inputs = table(key, "input", tables)
        no_bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
        out.append(
            SimDevice(
                id=unit,
                simdata=(
                    no_bits,
                    list(no_bits),
                    block(holding, DataType, SimData),
                    block(inputs, DataType, SimData),
                ),
            )
        )
    return out


async def serve(args):
    pymodbus, DataType, SimData, SimDevice = import_pymodbus()
    from pymodbus import FramerType
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    meters = devices(args[0], DataType, SimData, SimDevice)
    mode = args[1]
    if mode == "tcp" and len(args) == 3:
        server = ModbusTcpServer(meters, address=("127.0.0.1", int(args[2])))
    elif mode == "rtu" and len(args) in (3, 4):
        server = ModbusSerialServer(
            meters,
            framer=FramerType.RTU,
            port=args[2],
            baudrate=int(args[3]) if len(args) == 4 else 9600,
            bytesize=8,
            parity="N",
            stopbits=1,
        )
    else:
        fail(__doc__)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Returns once listening (TCP) or once the device is open (RTU); raises
    # if it cannot.
    await server.serve_forever(background=True)
    print("READY", flush=True)
    print(
        f"pymodbus {pymodbus.__version__} serving units "
        f"{sorted(m.id for m in meters)} over {mode} {args[2]}",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    await server.shutdown()


def main():
    args = sys.argv[1:]
    if args == ["--check"]:
        pymodbus, *_ = import_pymodbus()
        try:
            import serial  # noqa: F401  (RTU needs pyserial)
        except ImportError:
            fail("needs pyserial for RTU (pip install 'pymodbus[serial]')")
        print(f"pymodbus {pymodbus.__version__} usable")
        return
    if len(args) < 3 or args[1] not in ("tcp", "rtu"):
        fail(__doc__)
    # pymodbus logs through `logging`; keep it on stderr, warnings and up.
    import logging

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    try:
        asyncio.run(serve(args))
    except (OSError, RuntimeError) as e:
        fail(f"cannot serve over {args[1]} {args[2]}: {e}")


if __name__ == "__main__":
    main()
