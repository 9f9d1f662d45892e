//! The server side toward the governed client: a thin russh handler that hands what needs a
//! decision to the session task ([`super::serve`]) and answers what it decided.
//!
//! russh runs the handler in a task of its own (`'static`), so it cannot hold the session's
//! context: authentication and new channels go to the session task over a bounded queue, and
//! the handler waits for the answer. Everything a channel carries after it is opened reaches
//! the session task through the channel itself.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use russh::{
    server::{self, Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey},
    Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet,
};
use tokio::sync::{mpsc, oneshot, watch};

/// Channels (session, tunnels) one connection may have open at once.
pub const MAX_CHANNELS: usize = 16;

/// What the handler asks the session task.
pub enum FromClient {
    /// The client authenticates as `user` by `method`: the answer is whether the gateway logged
    /// in upstream for it.
    Auth {
        user: String,
        method: &'static str,
        reply: oneshot::Sender<bool>,
    },
    /// A session channel, accepted.
    Session(Channel<Msg>),
    /// Something refused here, to record (`direct-streamlocal /run/x`, `x11 channel`).
    Refused(String),
    /// A direct-tcpip channel (`ssh -L`, `-D`, `-W`, `-J`), not yet accepted: the session
    /// task judges it and accepts or rejects it through `reply`.
    DirectTcpip {
        channel: Channel<Msg>,
        host: String,
        port: u32,
        originator: (String, u32),
        reply: ChannelOpenHandle,
    },
    /// The client sends a variable for a session channel: whether it is allowed (then kept
    /// for the channel's request upstream).
    Env {
        channel: ChannelId,
        name: String,
        value: String,
        reply: oneshot::Sender<bool>,
    },
    /// The client asks to forward its agent on a session channel: whether it is allowed.
    Agent {
        channel: ChannelId,
        reply: oneshot::Sender<bool>,
    },
    /// The client asks for X11 forwarding on a session channel: whether it is allowed (then
    /// kept for the channel's request upstream).
    X11 {
        channel: ChannelId,
        request: X11Request,
        reply: oneshot::Sender<bool>,
    },
    /// `ssh -R`: the port the target listens on, when allowed and the target agreed.
    RemoteForward {
        address: String,
        port: u32,
        reply: oneshot::Sender<Option<u32>>,
    },
    CancelRemoteForward {
        address: String,
        port: u32,
        reply: oneshot::Sender<bool>,
    },
}

/// An allowed `x11-req`, judged by the session task ([`super::tunnel::x11`]) and kept for its session channel's request upstream.
#[derive(Debug, Clone)]
pub struct X11Request {
    pub single_connection: bool,
    pub protocol: String,
    pub cookie: String,
    pub screen: u32,
}

pub struct ClientSide {
    pub to_session: mpsc::Sender<FromClient>,
    /// Why every login is refused (the target could not be reached or verified), shown to the
    /// client as the authentication banner: `None` until the session task knows (it connects to
    /// the target while the client's key exchange runs), then `Some(Ok(()))` when nothing is.
    pub banner: watch::Receiver<Option<Result<(), String>>>,
    pub open_channels: Arc<AtomicUsize>,
}

impl ClientSide {
    async fn auth(&mut self, user: &str, method: &'static str) -> Result<Auth, russh::Error> {
        if matches!(&*self.banner.borrow(), Some(Err(_))) {
            return Ok(reject());
        }
        let (reply, answer) = oneshot::channel();
        let asked = self
            .to_session
            .send(FromClient::Auth {
                user: user.to_string(),
                method,
                reply,
            })
            .await;
        if asked.is_err() {
            return Ok(reject());
        }
        Ok(if answer.await.unwrap_or(false) {
            Auth::Accept
        } else {
            reject()
        })
    }

    async fn refused(&self, what: String) {
        let _ = self.to_session.send(FromClient::Refused(what)).await;
    }

    /// Asks the session task; `None` when it is gone (refused).
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> FromClient) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.to_session.send(make(reply)).await.ok()?;
        answer.await.ok()
    }

    /// Counts a channel against [`MAX_CHANNELS`]; false (and recorded) past it.
    async fn take_channel_slot(&self, what: &str) -> bool {
        if self.open_channels.fetch_add(1, Ordering::AcqRel) >= MAX_CHANNELS {
            self.open_channels.fetch_sub(1, Ordering::AcqRel);
            self.refused(format!(
                "{what} beyond {MAX_CHANNELS} channels open at once"
            ))
            .await;
            return false;
        }
        true
    }
}

/// No further methods: the client is refused (its identity was the kernel's, not a secret).
fn reject() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(MethodSet::from(&[][..])),
        partial_success: false,
    }
}

impl server::Handler for ClientSide {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        // Waits for the target's connection (bounded by its timeouts); a session task gone
        // without an answer refuses every login anyway.
        let refusal = match self.banner.wait_for(Option::is_some).await {
            Ok(resolved) => resolved.clone().and_then(Result::err),
            Err(_) => None,
        };
        Ok(refusal.map(|b| format!("{b}\r\n")))
    }

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.auth(user, "none").await
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // The password is not looked at and goes nowhere: the client is who the kernel says.
        self.auth(user, "password").await
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        _offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.auth(user, "publickey").await
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.take_channel_slot("session channel").await {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        reply.accept().await;
        if self
            .to_session
            .send(FromClient::Session(channel))
            .await
            .is_err()
        {
            self.open_channels.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.take_channel_slot("direct-tcpip channel").await {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        // Judged (and perhaps held) in the session task, so this handler goes on meanwhile.
        let sent = self
            .to_session
            .send(FromClient::DirectTcpip {
                channel,
                host: host_to_connect.to_string(),
                port: port_to_connect,
                originator: (originator_address.to_string(), originator_port),
                reply,
            })
            .await;
        if sent.is_err() {
            self.open_channels.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        self.refused(format!(
            "direct-streamlocal {}",
            crate::text::terminal_safe(socket_path)
        ))
        .await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        self.refused("x11 channel".into()).await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let asked = *port;
        let bound = self
            .ask(|reply| FromClient::RemoteForward {
                address: address.to_string(),
                port: asked,
                reply,
            })
            .await
            .flatten();
        Ok(match bound {
            Some(p) => {
                *port = p;
                true
            }
            None => false,
        })
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self
            .ask(|reply| FromClient::CancelRemoteForward {
                address: address.to_string(),
                port,
                reply,
            })
            .await
            .unwrap_or(false))
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refused(format!(
            "streamlocal-forward {}",
            crate::text::terminal_safe(socket_path)
        ))
        .await;
        Ok(false)
    }

    // Requests that other requests may follow are answered here, in order: an answer sent later
    // from the session task could be taken for the next request's.

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Kept by the channel's task and requested upstream once its request is allowed.
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let allowed = self
            .ask(|reply| FromClient::Env {
                channel,
                name: variable_name.to_string(),
                value: variable_value.to_string(),
                reply,
            })
            .await
            .unwrap_or(false);
        answer(session, channel, allowed)
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // russh answers it by what is returned.
        Ok(self
            .ask(|reply| FromClient::Agent { channel, reply })
            .await
            .unwrap_or(false))
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        single_connection: bool,
        x11_auth_protocol: &str,
        x11_auth_cookie: &str,
        x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // OpenSSH sends a cookie of its own making and puts the real one in when an X11
        // channel reaches it: what is passed on opens nothing by itself.
        let request = X11Request {
            single_connection,
            protocol: x11_auth_protocol.to_string(),
            cookie: x11_auth_cookie.to_string(),
            screen: x11_screen_number,
        };
        let allowed = self
            .ask(|reply| FromClient::X11 {
                channel,
                request,
                reply,
            })
            .await
            .unwrap_or(false);
        answer(session, channel, allowed)
    }

    async fn channel_close(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Answers a channel request the session's task judged: success when it was allowed.
fn answer(session: &mut Session, channel: ChannelId, allowed: bool) -> Result<(), russh::Error> {
    if allowed {
        session.channel_success(channel)
    } else {
        session.channel_failure(channel)
    }
}

/// The methods the gateway offers: whatever the client tries is answered by its identity.
pub fn methods() -> MethodSet {
    MethodSet::from(
        &[
            MethodKind::None,
            MethodKind::PublicKey,
            MethodKind::Password,
        ][..],
    )
}
