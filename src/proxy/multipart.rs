//! Multipart calls (audio transcriptions): find the `model` field without changing the body,
//! and rebuild the form only when a mapping replaces the model.

use actix_web::web::{Bytes, BytesMut};

use crate::error::ApiError;

/// One form field as received.
pub struct Part {
    /// The part's header lines, as received (name, value).
    headers: Vec<(String, Vec<u8>)>,
    name: Option<String>,
    data: Bytes,
}

/// A parsed multipart body.
pub struct Form {
    /// The body exactly as the client sent it.
    pub body: Bytes,
    pub boundary: String,
    pub parts: Vec<Part>,
    pub model: String,
    pub stream: bool,
}

/// Parses a `multipart/form-data` body; it must have a `model` field.
pub async fn read_form(content_type: &str, body: Bytes) -> Result<Form, ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| ApiError::invalid("request must be multipart/form-data with a boundary"))?;
    let source = body.clone();
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(source) });
    let mut multipart = multer::Multipart::new(stream, boundary.clone());
    let mut parts = Vec::new();
    let bad = |e: multer::Error| ApiError::invalid(format!("malformed multipart body: {e}"));
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let headers = field
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let name = field.name().map(str::to_owned);
        let data = field.bytes().await.map_err(bad)?;
        parts.push(Part {
            headers,
            name,
            data,
        });
    }
    // One value each: servers differ on which of two they read (Starlette the last), so a
    // second `model` could run a model other than the one checked and billed here.
    for once in ["model", "stream"] {
        if parts
            .iter()
            .filter(|p| p.name.as_deref() == Some(once))
            .count()
            > 1
        {
            return Err(ApiError::invalid(format!(
                "the form has more than one `{once}` field"
            )));
        }
    }
    let text = |wanted: &str| {
        parts
            .iter()
            .find(|p| p.name.as_deref() == Some(wanted))
            .and_then(|p| std::str::from_utf8(&p.data).ok())
            .map(|s| s.trim().to_owned())
    };
    let model = text("model")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("the form must have a `model` field"))?;
    super::check_model_name(&model)?;
    let stream = text("stream").is_some_and(|s| s == "true");
    Ok(Form {
        body,
        boundary,
        parts,
        model,
        stream,
    })
}

/// The same form with `model` set to `model`, under the same boundary.
pub fn with_model(form: &Form, model: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(form.body.len() + model.len());
    for part in &form.parts {
        out.extend_from_slice(b"--");
        out.extend_from_slice(form.boundary.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &part.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if part.name.as_deref() == Some("model") {
            out.extend_from_slice(model.as_bytes());
        } else {
            out.extend_from_slice(&part.data);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--");
    out.extend_from_slice(form.boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-alias\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01binary\r\n--XyZ--\r\n";

    #[actix_web::test]
    async fn the_model_is_found_and_replaced_leaving_the_file_intact() {
        let form = read_form(
            "multipart/form-data; boundary=XyZ",
            Bytes::from_static(BODY),
        )
        .await
        .unwrap();
        assert_eq!(form.model, "whisper-alias");
        let rebuilt = with_model(&form, "whisper-1");
        let again = read_form("multipart/form-data; boundary=XyZ", rebuilt)
            .await
            .unwrap();
        assert_eq!(again.model, "whisper-1");
        let file = again
            .parts
            .iter()
            .find(|p| p.name.as_deref() == Some("file"))
            .unwrap();
        assert_eq!(&file.data[..], b"RIFF\x00\x01binary");
        assert!(file
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == b"audio/wav"));
    }

    #[actix_web::test]
    async fn a_form_without_model_is_refused() {
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--XyZ--\r\n",
        );
        assert!(read_form("multipart/form-data; boundary=XyZ", body)
            .await
            .is_err());
        assert!(read_form("application/json", Bytes::new()).await.is_err());
    }
}
