//! Socket addresses as text, byte for byte as `Display` writes them, without `core::fmt` for
//! IPv4: through `Display` an IPv4 address took 1 000 instructions (callgrind), written once per
//! request (`X-Forwarded-For`) and once per connection (its log line).
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Longest textual IP address (IPv4-mapped IPv6).
pub(crate) const MAX_ADDRESS_LEN: usize = 45;

/// Writes `address` as text into `out`; returns the length.
pub(crate) fn write_ip(address: IpAddr, out: &mut [u8; MAX_ADDRESS_LEN]) -> usize {
    match address {
        IpAddr::V4(v4) => {
            let mut len = 0;
            let mut digits = itoa::Buffer::new();
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    out[len] = b'.';
                    len += 1;
                }
                let octet = digits.format(octet).as_bytes();
                out[len..len + octet.len()].copy_from_slice(octet);
                len += octet.len();
            }
            len
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            let mut cursor = &mut out[..];
            let _ = write!(cursor, "{v6}");
            MAX_ADDRESS_LEN - cursor.len()
        }
    }
}

/// A socket address that displays as `SocketAddr` does (`198.18.0.1:40000`, `[fd00::1]:22`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SocketAddrText(pub SocketAddr);

impl fmt::Display for SocketAddrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let SocketAddr::V4(v4) = self.0 else {
            return fmt::Display::fmt(&self.0, f);
        };
        let mut text = [0u8; MAX_ADDRESS_LEN];
        let len = write_ip(IpAddr::V4(*v4.ip()), &mut text);
        // Digits and dots only.
        f.write_str(std::str::from_utf8(&text[..len]).map_err(|_| fmt::Error)?)?;
        f.write_str(":")?;
        f.write_str(itoa::Buffer::new().format(v4.port()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(address: IpAddr) -> String {
        let mut out = [0u8; MAX_ADDRESS_LEN];
        let len = write_ip(address, &mut out);
        String::from_utf8(out[..len].to_vec()).unwrap()
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for address in [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "198.18.0.1",
            "255.255.255.255",
            "::1",
            "fd00::1:2",
            "::ffff:255.255.255.255",
            "2001:db8:85a3:8d3:1319:8a2e:370:7348",
        ] {
            let address: IpAddr = address.parse().unwrap();
            assert_eq!(text(address), address.to_string());
        }
        for octet in 0..=255u8 {
            let address = IpAddr::from([octet, 255 - octet, octet / 3, 7]);
            assert_eq!(text(address), address.to_string());
        }
    }

    #[test]
    fn socket_addresses_display_as_the_standard_ones() {
        for address in [
            "198.18.0.1:40000",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[fd00::1]:22",
            "[::ffff:1.2.3.4]:80",
        ] {
            let address: SocketAddr = address.parse().unwrap();
            assert_eq!(SocketAddrText(address).to_string(), address.to_string());
        }
    }
}
