//! The packet-rate benchmark's machinery on a few thousand frames: the generator's frames cross
//! the veth, `cdn_steer` (attached in native XDP) counts them with the row's verdict, and
//! forwarded frames arrive at the sink on the far end. Keeps `cargo xtask bench --rate` from
//! silently measuring nothing.

use std::time::Duration;

use anyhow::Result;
use cdn_common::counters::{Action, Reason};
use cdn_tests::rate::{Bare, Budget, RateLab, Subject, topology::Topology};

const FRAMES: u64 = 5_000;

#[test]
fn generated_frames_cross_the_veth_and_are_counted() -> Result<()> {
    let topo = Topology::new()?;
    topo.dut.enter(|| -> Result<()> {
        let mut lab = RateLab::new(&topo)?;
        let budget = Budget {
            duration: Duration::from_secs(10),
            frames: FRAMES,
            stop: Default::default(),
        };
        for row in 0..lab.rows.len() {
            for subject in [Subject::Steer, Subject::Bare] {
                // `measure` itself fails if nothing was handled, if cdn_steer gave another
                // verdict, or if forwarded frames did not reach the sink.
                let m = lab.measure(row, subject, &[0], &budget)?;
                let r = &lab.rows[row];
                let what = format!("{} ({subject:?}): {m:?}", r.name);
                assert_eq!(m.generated, FRAMES, "{what}");
                // A few frames may be dropped on a full veth queue, never most.
                assert!(m.handled >= FRAMES * 9 / 10, "{what}");
                if r.bare == Bare::Pass {
                    // Only what the stack sends in reply (an ARP request for the ICMP error
                    // about the unserved steering port, say) reaches a sink.
                    assert!(m.sunk <= m.handled / 100, "{what}");
                } else {
                    assert_eq!(m.sunk, m.handled, "{what}");
                }
                if subject == Subject::Steer {
                    let action = match r.bare {
                        Bare::Tx => Action::Tx,
                        Bare::Redirect => Action::Redirect,
                        Bare::Pass => Action::Pass,
                    };
                    assert_eq!(m.verdicts, vec![(r.reason, action, m.handled)], "{what}");
                }
            }
        }
        assert_eq!(lab.rows[0].reason, Reason::Forwarded);
        Ok(())
    })?
}
