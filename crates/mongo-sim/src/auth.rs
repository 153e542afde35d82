//! Optional authentication: one user on `admin`, SCRAM-SHA-256 (RFC 5802 / RFC 7677) over
//! MongoDB's `saslStart` / `saslContinue` conversation.
//!
//! The password is used as given (SASLprep is the identity for ASCII passwords, which is what
//! tests use). `speculativeAuthenticate` in the handshake is ignored, so drivers fall back to
//! an explicit `saslStart`.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::error::{CommandError, CommandResult};

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The minimum drivers accept for SCRAM-SHA-256.
const ITERATIONS: u32 = 4096;
pub const AUTHENTICATION_FAILED: i32 = 18;
pub const MECHANISM_UNAVAILABLE: i32 = 334;

/// Commands an unauthenticated connection may run.
pub const UNAUTHENTICATED_COMMANDS: &[&str] = &[
    "hello",
    "isMaster",
    "ismaster",
    "saslStart",
    "saslContinue",
    "ping",
    "buildInfo",
    "buildinfo",
];

/// The stored credential of the one user (what a server keeps: never the password).
#[derive(Clone)]
pub struct Credential {
    pub user: String,
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

impl Credential {
    pub fn new(user: &str, password: &str) -> Credential {
        let salt: [u8; 16] = rand::random();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2::<Hmac<Sha256>>(password.as_bytes(), &salt, ITERATIONS, &mut salted)
            .expect("HMAC takes keys of any length");
        let client_key = hmac(&salted, b"Client Key");
        Credential {
            user: user.to_string(),
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

/// Per-connection authentication state.
#[derive(Debug, Default, Clone)]
pub struct ConnAuth {
    pub user: Option<String>,
    conversation: Option<Conversation>,
}

#[derive(Debug, Clone)]
enum Conversation {
    /// Server-first sent; waiting for the client-final message.
    AwaitingProof {
        id: i32,
        user_known: bool,
        client_first_bare: String,
        server_first: String,
        nonce: String,
        /// `saslStart` asked (in `options`) to skip the final empty round trip.
        skip_empty_exchange: bool,
    },
    /// Proof verified and server signature sent; waiting for the empty final exchange.
    AwaitingDone { id: i32, user: String },
}

fn failed() -> CommandError {
    CommandError::new(AUTHENTICATION_FAILED, "Authentication failed.")
}

fn payload_bytes(cmd: &Document) -> CommandResult<Vec<u8>> {
    match cmd.get("payload") {
        Some(Bson::Binary(b)) => Ok(b.bytes.clone()),
        Some(Bson::String(s)) => Ok(s.as_bytes().to_vec()),
        _ => Err(CommandError::bad_value("sasl payload must be binary data")),
    }
}

fn payload(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    })
}

/// `a=...` attributes of a SCRAM message.
fn attr(msg: &str, key: char) -> Option<&str> {
    msg.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(key) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

/// SCRAM `saslname` unescaping (`=2C` → `,`, `=3D` → `=`).
fn unescape_name(name: &str) -> String {
    name.replace("=2C", ",").replace("=3D", "=")
}

impl ConnAuth {
    pub fn is_authenticated(&self) -> bool {
        self.user.is_some()
    }

    pub fn sasl_start(
        &mut self,
        cred: &Credential,
        db: &str,
        cmd: &Document,
    ) -> CommandResult<Document> {
        let mechanism = cmd.get_str("mechanism").unwrap_or("");
        if mechanism != MECHANISM {
            return Err(CommandError::new(
                MECHANISM_UNAVAILABLE,
                format!("Received authentication for mechanism {mechanism} which is not enabled"),
            ));
        }
        let raw = payload_bytes(cmd)?;
        let msg = std::str::from_utf8(&raw).map_err(|_| failed())?;
        // gs2 header: no channel binding.
        let bare = msg
            .strip_prefix("n,,")
            .or_else(|| msg.strip_prefix("y,,"))
            .ok_or_else(failed)?;
        let user = unescape_name(attr(bare, 'n').ok_or_else(failed)?);
        let client_nonce = attr(bare, 'r').ok_or_else(failed)?;
        let server_nonce: [u8; 24] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(&cred.salt));
        let id = 1;
        self.conversation = Some(Conversation::AwaitingProof {
            id,
            // Unknown users and other databases run the whole exchange and fail at the end,
            // as real servers do (no user enumeration).
            user_known: user == cred.user && db == "admin",
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            skip_empty_exchange: cmd
                .get_document("options")
                .ok()
                .and_then(|o| o.get_bool("skipEmptyExchange").ok())
                .unwrap_or(false),
        });
        Ok(doc! {"conversationId": id, "done": false, "payload": payload(server_first.as_bytes())})
    }

    pub fn sasl_continue(&mut self, cred: &Credential, cmd: &Document) -> CommandResult<Document> {
        let conversation = self
            .conversation
            .take()
            .ok_or_else(|| CommandError::new(17, "No SASL session state found"))?;
        match conversation {
            Conversation::AwaitingProof {
                id,
                user_known,
                client_first_bare,
                server_first,
                nonce,
                skip_empty_exchange,
            } => {
                let raw = payload_bytes(cmd)?;
                let msg = std::str::from_utf8(&raw).map_err(|_| failed())?;
                let proof_at = msg.rfind(",p=").ok_or_else(failed)?;
                let without_proof = &msg[..proof_at];
                let proof = B64.decode(&msg[proof_at + 3..]).map_err(|_| failed())?;
                if attr(without_proof, 'r') != Some(nonce.as_str())
                    || attr(without_proof, 'c') != Some("biws")
                    || !user_known
                    || proof.len() != cred.stored_key.len()
                {
                    return Err(failed());
                }
                let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
                let client_signature = hmac(&cred.stored_key, auth_message.as_bytes());
                let client_key: Vec<u8> = proof
                    .iter()
                    .zip(&client_signature)
                    .map(|(a, b)| a ^ b)
                    .collect();
                if sha256(&client_key) != cred.stored_key {
                    return Err(failed());
                }
                let server_signature = hmac(&cred.server_key, auth_message.as_bytes());
                let server_final = format!("v={}", B64.encode(server_signature));
                let skip_empty = skip_empty_exchange;
                if skip_empty {
                    self.user = Some(cred.user.clone());
                } else {
                    self.conversation = Some(Conversation::AwaitingDone {
                        id,
                        user: cred.user.clone(),
                    });
                }
                Ok(
                    doc! {"conversationId": id, "done": skip_empty, "payload": payload(server_final.as_bytes())},
                )
            }
            Conversation::AwaitingDone { id, user } => {
                self.user = Some(user);
                Ok(doc! {"conversationId": id, "done": true, "payload": payload(b"")})
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client side of SCRAM-SHA-256, written from RFC 5802 §3.
    fn client_final(password: &str, client_first_bare: &str, server_first: &str) -> String {
        let salt = B64.decode(attr(server_first, 's').unwrap()).unwrap();
        let iterations: u32 = attr(server_first, 'i').unwrap().parse().unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2::<Hmac<Sha256>>(password.as_bytes(), &salt, iterations, &mut salted)
            .unwrap();
        let client_key = hmac(&salted, b"Client Key");
        let stored = sha256(&client_key);
        let without_proof = format!("c=biws,r={}", attr(server_first, 'r').unwrap());
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let sig = hmac(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    fn run(password: &str) -> CommandResult<Document> {
        let cred = Credential::new("u", "secret");
        let mut conn = ConnAuth::default();
        let first_bare = "n=u,r=abcdef";
        let start = conn.sasl_start(
            &cred,
            "admin",
            &doc! {"saslStart": 1, "mechanism": MECHANISM, "payload": payload(format!("n,,{first_bare}").as_bytes())},
        )?;
        let server_first =
            String::from_utf8(start.get_binary_generic("payload").unwrap().clone()).unwrap();
        assert!(server_first.starts_with("r=abcdef"));
        let fin = client_final(password, first_bare, &server_first);
        let r = conn.sasl_continue(
            &cred,
            &doc! {"saslContinue": 1, "conversationId": 1, "payload": payload(fin.as_bytes())},
        )?;
        assert!(!r.get_bool("done").unwrap());
        assert!(!conn.is_authenticated());
        let r = conn.sasl_continue(
            &cred,
            &doc! {"saslContinue": 1, "conversationId": 1, "payload": payload(b"")},
        )?;
        assert!(r.get_bool("done").unwrap());
        assert!(conn.is_authenticated());
        Ok(r)
    }

    #[test]
    fn right_password_authenticates() {
        run("secret").unwrap();
    }

    #[test]
    fn wrong_password_fails_with_18() {
        assert_eq!(run("nope").unwrap_err().code, AUTHENTICATION_FAILED);
    }

    #[test]
    fn skip_empty_exchange_finishes_in_two_round_trips() {
        let cred = Credential::new("u", "secret");
        let mut conn = ConnAuth::default();
        let start = conn
            .sasl_start(
                &cred,
                "admin",
                &doc! {"saslStart": 1, "mechanism": MECHANISM, "payload": payload(b"n,,n=u,r=xyz"), "options": {"skipEmptyExchange": true}},
            )
            .unwrap();
        let server_first =
            String::from_utf8(start.get_binary_generic("payload").unwrap().clone()).unwrap();
        let fin = client_final("secret", "n=u,r=xyz", &server_first);
        let r = conn
            .sasl_continue(
                &cred,
                &doc! {"saslContinue": 1, "conversationId": 1, "payload": payload(fin.as_bytes())},
            )
            .unwrap();
        assert!(r.get_bool("done").unwrap());
        assert!(conn.is_authenticated());
    }

    #[test]
    fn other_mechanisms_are_refused() {
        let cred = Credential::new("u", "p");
        let mut conn = ConnAuth::default();
        let err = conn
            .sasl_start(&cred, "admin", &doc! {"saslStart": 1, "mechanism": "SCRAM-SHA-1", "payload": payload(b"n,,n=u,r=x")})
            .unwrap_err();
        assert_eq!(err.code, MECHANISM_UNAVAILABLE);
    }
}
