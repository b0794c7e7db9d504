//! The stack's floor: the leanest proxy actix-web and awc make, measured by `benches/run.sh`
//! beside nginx and Switchyard. One worker, one route, no middleware, no logging, no
//! authentication, no metering: the request body goes to the upstream over a keep-alive
//! connection and its answer comes back with its status and content type. What Switchyard
//! spends over this is its own work; what this spends over nginx is the stack's.
//!
//! Usage: floor_proxy LISTEN_ADDR UPSTREAM_BASE_URL (e.g. 127.0.0.1:18184 http://127.0.0.1:18181)

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

// The same allocator as the router, so the difference is code, not malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Upstream {
    client: awc::Client,
    base: String,
}

async fn forward(
    req: HttpRequest,
    body: web::Bytes,
    upstream: web::Data<Upstream>,
) -> HttpResponse {
    let mut outbound = upstream
        .client
        .post(format!("{}{}", upstream.base, req.path()));
    if let Some(content_type) = req.headers().get(CONTENT_TYPE) {
        outbound = outbound.insert_header((CONTENT_TYPE, content_type.clone()));
    }
    let mut answer = match outbound.send_body(body).await {
        Ok(answer) => answer,
        Err(err) => return HttpResponse::BadGateway().body(err.to_string()),
    };
    let mut response = HttpResponse::build(answer.status());
    if let Some(content_type) = answer.headers().get(CONTENT_TYPE) {
        response.insert_header((CONTENT_TYPE, content_type.clone()));
    }
    match answer.body().limit(16 * 1024 * 1024).await {
        Ok(bytes) => response.body(bytes),
        Err(err) => HttpResponse::BadGateway().body(err.to_string()),
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(base)) = (args.next(), args.next()) else {
        eprintln!("usage: floor_proxy LISTEN_ADDR UPSTREAM_BASE_URL");
        std::process::exit(2);
    };
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            // awc clients are per thread, as in the router; keep-alive pool as its own.
            let client = awc::Client::builder()
                .connector(awc::Connector::new().limit(4096))
                .disable_redirects()
                .finish();
            App::new()
                .app_data(web::Data::new(Upstream {
                    client,
                    base: base.clone(),
                }))
                .default_service(web::to(forward))
        })
        .workers(1)
        .bind(listen)?
        .run()
        .await
    })
}
