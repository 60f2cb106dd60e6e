//! A TCP proxy on 127.0.0.1:0 in front of a real server (NATS, Redis, RabbitMQ) whose
//! open connections a test can cut at once, as a server restart or a network drop
//! would, while it keeps accepting new ones (so clients reconnect through it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub addr: SocketAddr,
    /// One task per proxied connection; aborting it closes both sides.
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Forwards every connection made to [`Proxy::addr`] to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = Arc::clone(&conns);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(task);
            }
        });
        Self {
            addr,
            conns,
            accept,
        }
    }

    /// Closes every connection open now; returns how many there were.
    pub fn cut(&self) -> usize {
        let open: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        let live = open.iter().filter(|t| !t.is_finished()).count();
        for t in open {
            t.abort();
        }
        live
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
