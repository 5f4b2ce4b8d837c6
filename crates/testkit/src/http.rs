//! One HTTP/1.1 request on a fresh loopback connection, for tests of
//! processes that serve HTTP (the ingress, a worker's health endpoint).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Error, Result};

/// `method path` to `127.0.0.1:port` with `headers` and a JSON `body` (if
/// any), read to the end within 10 s: the status and the body as text.
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<(u16, String)> {
    let io = |context: &str| {
        let context = format!("{context} ({method} {path} on port {port})");
        move |source| Error::Io { context, source }
    };
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(io("cannot connect"))?;
    let payload = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ncontent-length: {}\r\n",
        payload.len()
    );
    if body.is_some() {
        head.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    stream
        .write_all(format!("{head}\r\n{payload}").as_bytes())
        .await
        .map_err(io("cannot send"))?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| io("no answer within 10 s")(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io("cannot read the answer"))?;
    let text = String::from_utf8_lossy(&answer);
    let bad = || io("not an HTTP answer")(std::io::ErrorKind::InvalidData.into());
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if chunked {
        return Ok((status, dechunk(rest).ok_or_else(bad)?));
    }
    Ok((status, rest.to_owned()))
}

/// The body of a `Transfer-Encoding: chunked` answer; `None` if it is not
/// well formed.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_chunked_body_is_joined() {
        assert_eq!(
            super::dechunk("5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n").as_deref(),
            Some("hello, world")
        );
        assert_eq!(super::dechunk("5\r\nhel"), None);
    }
}
