//! What every shard runtime shares: SO_REUSEPORT listeners (one per shard, so the kernel
//! spreads connections across cores with no hand-off) and pinning a thread to its CPU.

use std::net::{SocketAddr, TcpListener};

/// A non-blocking SO_REUSEPORT TCP listener on `addr`.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// `shards` listeners sharing one address; with port 0 the first bind picks the port.
pub fn listen_shards(addr: SocketAddr, shards: usize) -> std::io::Result<Vec<TcpListener>> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(shards.max(1));
    for _ in 0..shards.max(1) {
        let l = listen(addr)?;
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::other(format!("CPU {cpu} is out of range")));
    }
    // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and its size is passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The vendored glommio's reactor (dataplane/vendor/README.md) keeps its timers armed across
/// loop iterations and preempts by the clock: these check that the shards still preempt a busy
/// task queue and still wake for their timers.
#[cfg(test)]
mod runtime_tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use glommio::{LocalExecutorBuilder, Placement};

    /// Runs `f` on a glommio executor in its own thread; fails instead of hanging.
    fn on_shard<T, Fut>(f: impl FnOnce() -> Fut + Send + 'static) -> T
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
    {
        let (tx, rx) = mpsc::channel();
        LocalExecutorBuilder::new(Placement::Unbound)
            .preempt_timer(Duration::from_millis(10))
            .spawn(move || async move {
                let _ = tx.send(f().await);
            })
            .expect("executor");
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the shard hung")
    }

    #[test]
    fn a_busy_task_queue_is_preempted_so_a_timer_fires() {
        let spins = on_shard(|| async {
            let done = Rc::new(Cell::new(false));
            let flag = Rc::clone(&done);
            let timer = glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(20)).await;
                flag.set(true);
            })
            .detach();
            // Never sleeps: only a preemption lets the executor run its timers.
            let mut spins = 0u64;
            while !done.get() {
                spins += 1;
                glommio::yield_if_needed().await;
            }
            timer.await;
            spins
        });
        assert!(spins > 0);
    }

    #[test]
    fn a_sleeping_shard_wakes_for_an_earlier_timer_made_while_it_slept() {
        let (tx, rx) = glommio::channels::shared_channel::new_bounded::<()>(1);
        // Another shard pokes this one over a channel (a foreign wake-up) after 50 ms; this
        // one is asleep by then, its wake timer armed for its 1.5 s timer.
        let poke = LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || async move {
                let tx = tx.connect().await;
                glommio::timer::sleep(Duration::from_millis(50)).await;
                tx.send(()).await.expect("send");
            })
            .expect("poking executor");
        let (early, late) = on_shard(move || async move {
            let start = Instant::now();
            let long = glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(1500)).await;
                start.elapsed()
            })
            .detach();
            let rx = rx.connect().await;
            rx.recv().await.expect("poke");
            // A timer earlier than the one the shard slept for.
            glommio::timer::sleep(Duration::from_millis(10)).await;
            let early = start.elapsed();
            (early, long.await.expect("long timer"))
        });
        poke.join().expect("poke thread");
        assert!(late >= Duration::from_millis(1500), "{late:?}");
        // The 10 ms timer after a 50 ms poke: woken for it, not at 1.5 s with the long one.
        assert!(
            early < Duration::from_millis(1000),
            "early {early:?}, late {late:?}"
        );
    }

    /// Voluntary context switches of thread `tid` of this process so far.
    fn sleeps_of(tid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            .expect("thread status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches")
    }

    #[test]
    fn an_idle_shard_looks_at_its_rings_again_within_its_longest_sleep() {
        // The vendored glommio bounds each sleep in io_uring_enter (100 ms), so that a
        // completion whose wake-up the kernel lost is picked up at the latest then
        // (dataplane/vendor/README.md). Its only timer here is 2 s away: without the bound the
        // shard sleeps through the whole measurement.
        let (tx, rx) = mpsc::channel();
        let shard = LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || async move {
                // SAFETY: gettid has no preconditions.
                let _ = tx.send(unsafe { libc::gettid() });
                glommio::timer::sleep(Duration::from_secs(2)).await;
            })
            .expect("executor");
        let tid = rx.recv_timeout(Duration::from_secs(30)).expect("tid");
        std::thread::sleep(Duration::from_millis(200));
        let before = sleeps_of(tid);
        std::thread::sleep(Duration::from_millis(700));
        let woke = sleeps_of(tid) - before;
        shard.join().expect("shard");
        assert!(
            (3..=20).contains(&woke),
            "an idle shard woke {woke} times in 700 ms"
        );
    }

    #[test]
    fn timers_in_a_row_each_wake_a_sleeping_shard() {
        let slept = on_shard(|| async {
            let mut slept = Vec::new();
            for ms in [30u64, 5, 40, 1, 15] {
                let t = Instant::now();
                glommio::timer::sleep(Duration::from_millis(ms)).await;
                slept.push((ms, t.elapsed()));
            }
            slept
        });
        for (ms, took) in slept {
            assert!(took >= Duration::from_millis(ms), "{ms} ms took {took:?}");
        }
    }
}
