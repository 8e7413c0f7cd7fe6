//! A server namespace shaped like a GPU box behind one public port: sshd on 0.0.0.0:22 and [::]:22,
//! an OpenAI-style HTTP backend on 127.0.0.1:30000, and a client namespace in front of it.
use crate::backends::{self, Backend};
use crate::netns::Link;
use crate::sshd::{SshConnection, Sshd};

/// The client and server namespaces, sshd and the backend; muxer is the test's to start.
pub struct PublicHost {
    /// The namespaces and their link.
    pub link: Link,
    /// The real sshd on port 22.
    pub sshd: Sshd,
    _http: Backend,
}

impl PublicHost {
    /// Creates the namespaces and starts sshd and the backend (named `llm`).
    pub fn new() -> PublicHost {
        let link = Link::new();
        let sshd = Sshd::start(&link.server, &["0.0.0.0:22", "[::]:22"]);
        let http = backends::http(&link.server, "127.0.0.1:30000".parse().unwrap(), "llm");
        PublicHost {
            link,
            sshd,
            _http: http,
        }
    }

    /// A login from the client to `host` port 22 as sshd saw it: through muxer it accepted on a
    /// loopback address, and with the transparent source it still sees the client's address.
    pub fn ssh(&self, host: &str) -> SshConnection {
        self.sshd.connection(&self.link.client, host, 22, &[])
    }
}

impl Default for PublicHost {
    fn default() -> Self {
        Self::new()
    }
}
