//! Serial buses: the port the site file names, opened at its line
//! settings (tokio-serial), carrying RTU frames ([`super::rtu`]).
//!
//! A port that fails or closes (an adapter unplugged, the other end of a
//! pty pair gone) is reopened by path every [`RETRY_DELAY`] until it opens
//! again or shutdown, so the simulator outlives a restarted socat.

use std::io;
use std::sync::Arc;

use facwatch_proto::profile::Parity;
use facwatch_proto::site::SerialLine;
use tokio_serial::{DataBits, FlowControl, SerialPortBuilderExt, SerialStream, StopBits};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{rtu, Bus, RETRY_DELAY};

/// Opens `line`'s port at its settings. Needs a Tokio runtime.
pub(super) fn open(line: &SerialLine) -> io::Result<SerialStream> {
    let parity = match line.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    tokio_serial::new(&line.path, line.baud)
        .parity(parity)
        .data_bits(if line.data_bits == 7 {
            DataBits::Seven
        } else {
            DataBits::Eight
        })
        .stop_bits(if line.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        })
        .flow_control(FlowControl::None)
        .open_native_async()
        .map_err(|e| {
            let e = io::Error::from(e);
            io::Error::new(
                e.kind(),
                format!("cannot open serial port {}: {e}", line.path),
            )
        })
}

/// Serves `bus` on `port` until `shutdown`, reopening the port after it
/// fails.
pub(super) async fn serve(
    port: SerialStream,
    line: SerialLine,
    bus: Arc<Bus>,
    shutdown: CancellationToken,
) {
    let mut port = Some(port);
    loop {
        if let Some(open_port) = port.take() {
            match rtu::serve_stream(open_port, Arc::clone(&bus), shutdown.clone()).await {
                Ok(()) if shutdown.is_cancelled() => return,
                Ok(()) => warn!(bus = %bus.name, "Serial port closed; reopening."),
                Err(e) => warn!(bus = %bus.name, error = %e, "Serial port failed; reopening."),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY_DELAY) => {}
        }
        match open(&line) {
            Ok(reopened) => {
                info!(bus = %bus.name, "Serial port reopened.");
                port = Some(reopened);
            }
            Err(e) => debug!(bus = %bus.name, error = %e, "Serial port does not open yet."),
        }
    }
}
