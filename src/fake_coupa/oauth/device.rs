//! The device authorization grant (RFC 8628): the device authorization
//! endpoint and the polling answers, `slow_down` included.

use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use rand::RngCore;

use super::{
    authenticate, check_scopes, invalid_grant, oauth_error, random_token, read_form, refuse,
    Refusal,
};
use crate::fake_coupa::{json, FakeBody, FakeClient, FakeState};

/// RFC 8628's grant type, spelled out here: a fake shares no constant with
/// the code it checks.
pub(super) const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// RFC 8628 §3.5: each `slow_down` adds this to the polling interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

const DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(600);

pub(super) struct DeviceGrant {
    client_id: String,
    scope: String,
    expires_at: Instant,
    /// Answers still to give before approval, in order.
    script: Vec<String>,
    interval: Duration,
    last_poll: Option<Instant>,
    done: bool,
}

/// Device authorization polls, per RFC 8628 §3.5.
pub(super) fn poll_device(
    state: &FakeState,
    client: &FakeClient,
    device_code: &str,
) -> Result<(String, bool), Refusal> {
    let error = |code: &str| Err(refuse(StatusCode::BAD_REQUEST, code, code));
    let mut guard = state
        .oauth
        .lock()
        .map_err(|_| invalid_grant("server lock"))?;
    let oauth = &mut *guard;
    oauth.device_polls += 1;
    let Some(device) = oauth.devices.get_mut(device_code) else {
        return Err(invalid_grant("unknown device code"));
    };
    if device.client_id != client.id || device.done {
        return Err(invalid_grant(
            "device code not issued to this client, or used",
        ));
    }
    let now = Instant::now();
    if now >= device.expires_at {
        return error("expired_token");
    }
    if let Some(last) = device.last_poll.replace(now) {
        if now.duration_since(last) < device.interval {
            oauth.device_polls_too_fast += 1;
            device.interval += SLOW_DOWN_STEP;
            return error("slow_down");
        }
    }
    if oauth.deny_consent {
        return error("access_denied");
    }
    if !device.script.is_empty() {
        let answer = device.script.remove(0);
        if answer == "slow_down" {
            device.interval += SLOW_DOWN_STEP;
        }
        return error(&answer);
    }
    device.done = true;
    Ok((device.scope.clone(), true))
}

/// `POST /oauth2/device_authorizations`.
pub(in crate::fake_coupa) async fn device_authorization(
    state: &FakeState,
    base_url: &str,
    request: Request<Incoming>,
) -> Response<FakeBody> {
    let (basic, form) = match read_form(request).await {
        Ok(form) => form,
        Err(refusal) => return refusal.response(),
    };
    let client = match authenticate(state, basic, &form) {
        Ok(client) => client,
        Err(refusal) => return refusal.response(),
    };
    let scope = match check_scopes(&client, form.get("scope").map(String::as_str).unwrap_or("")) {
        Ok(scope) => scope,
        Err(refusal) => return refusal.response(),
    };
    let Ok(mut oauth) = state.oauth.lock() else {
        return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "lock");
    };
    let device_code = random_token("device.", 24);
    let user_code = {
        let mut raw = [0u8; 8];
        rand::rng().fill_bytes(&mut raw);
        let letters: String = raw.iter().map(|b| (b'B' + b % 24) as char).collect();
        format!("{}-{}", &letters[..4], &letters[4..])
    };
    let interval = oauth.device_interval;
    let script = oauth.device_script.clone();
    oauth.devices.insert(
        device_code.clone(),
        DeviceGrant {
            client_id: client.id,
            scope,
            expires_at: Instant::now() + DEVICE_CODE_LIFETIME,
            script,
            interval,
            last_poll: None,
            done: false,
        },
    );
    json(
        StatusCode::OK,
        serde_json::json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": format!("{base_url}/oauth2/device"),
            "verification_uri_complete": format!("{base_url}/oauth2/device?user_code={user_code}"),
            "expires_in": DEVICE_CODE_LIFETIME.as_secs(),
            "interval": interval.as_secs(),
        }),
    )
}
