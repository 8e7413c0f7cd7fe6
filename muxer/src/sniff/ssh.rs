//! SSH: every SSH peer opens with an identification string starting `SSH-` (RFC 4253 §4.2).
use super::{literal_prefix, Detected, Verdict};

/// Matches the `SSH-` identification prefix.
pub fn probe(bytes: &[u8]) -> Verdict {
    literal_prefix(bytes, b"SSH-", || Detected::Ssh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_states() {
        assert_eq!(probe(b""), Verdict::NeedMore);
        assert_eq!(probe(b"SS"), Verdict::NeedMore);
        assert_eq!(probe(b"SSH-"), Verdict::Match(Detected::Ssh));
        assert_eq!(
            probe(b"SSH-2.0-OpenSSH_9.2\r\n"),
            Verdict::Match(Detected::Ssh)
        );
        assert_eq!(probe(b"SSX"), Verdict::NoMatch);
        assert_eq!(probe(b"ssh-"), Verdict::NoMatch);
    }
}
