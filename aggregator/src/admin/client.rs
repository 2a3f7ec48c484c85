//! What `fedaggregator status` uses: one HTTP/1.1 GET of `/api/status` from an admin port.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;

use super::report::StatusReport;

/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why the admin port could not be read.
#[derive(Debug, Error)]
pub enum AdminClientError {
    #[error("admin address {0:?}: expected http://HOST:PORT (the admin port is plain HTTP)")]
    Address(String),
    #[error("cannot reach the admin port at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{url} answered HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} did not answer within 10 s")]
    Timeout { url: String },
    #[error("{url} sent a status this version cannot read: {message}")]
    Decode { url: String, message: String },
}

/// `host:port` out of `http://host:port[/...]` or `host:port`.
fn authority(base: &str) -> Result<String, AdminClientError> {
    let rest = match base.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return Err(AdminClientError::Address(base.to_string())),
        None => base,
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || !authority.contains(':') {
        return Err(AdminClientError::Address(base.to_string()));
    }
    Ok(authority.to_string())
}

/// GETs `path` from the admin port at `base`; returns the status code and body.
pub async fn get(base: &str, path: &str) -> Result<(u16, String), AdminClientError> {
    let authority = authority(base)?;
    let url = format!("http://{authority}{path}");
    let connect_error = |message: String| AdminClientError::Connect {
        url: url.clone(),
        message,
    };
    let work = async {
        let stream = TcpStream::connect(&authority)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, &authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| connect_error(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| connect_error(e.to_string()))?
            .to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| AdminClientError::Timeout { url: url.clone() })?
}

/// The aggregator's status from its admin port.
pub async fn fetch_status(base: &str) -> Result<StatusReport, AdminClientError> {
    let (status, body) = get(base, "/api/status").await?;
    let url = format!("http://{}/api/status", authority(base)?);
    if status != 200 {
        return Err(AdminClientError::Http {
            url,
            status,
            body: body.trim().to_string(),
        });
    }
    serde_json::from_str(&body).map_err(|e| AdminClientError::Decode {
        url,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            authority("http://127.0.0.1:9464").unwrap(),
            "127.0.0.1:9464"
        );
        assert_eq!(
            authority("http://127.0.0.1:9464/").unwrap(),
            "127.0.0.1:9464"
        );
        assert_eq!(authority("localhost:80").unwrap(), "localhost:80");
        for bad in ["https://x:1", "http://", "localhost"] {
            let err = authority(bad).unwrap_err().to_string();
            assert!(err.contains("http://HOST:PORT"), "{err}");
        }
    }
}
