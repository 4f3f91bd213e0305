//! A [`Transmit`] that records instead of sending: for driving the engine in tests and
//! benchmarks without sockets or a TUN device.

use std::io;
use std::net::SocketAddr;

use parking_lot::Mutex;

use crate::engine::Transmit;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Datagram(SocketAddr, Vec<u8>),
    Tun(Vec<u8>),
}

#[derive(Default)]
pub struct Capture {
    out: Mutex<Vec<Output>>,
}

impl Capture {
    /// Everything recorded so far, oldest first; the record is emptied.
    pub fn take(&self) -> Vec<Output> {
        std::mem::take(&mut *self.out.lock())
    }
}

impl Transmit for Capture {
    fn send(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        self.out
            .lock()
            .push(Output::Datagram(to, datagram.to_vec()));
        Ok(())
    }

    fn write_tun(&self, packet: &[u8]) -> io::Result<()> {
        self.out.lock().push(Output::Tun(packet.to_vec()));
        Ok(())
    }
}
