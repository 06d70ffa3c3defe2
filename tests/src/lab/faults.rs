//! Starting and stopping the parts of a node one by one: what a chaos run does to the lab.
//! Every stop is a SIGKILL of a process the lab started (by pid, through its `Process`), as a
//! crash would be; every start runs it again the way the lab first did.

use anyhow::{Context as _, Result};

use super::{
    Lab, UDP_PORT, VIP_V4, VIP_V6,
    config::{h3_httpd_args, node_bird_config},
    spawn,
};

impl Lab {
    /// Starts node `i`'s BIRD with the lab's configuration; returns once it answers.
    pub(super) fn start_node_bird(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let bird = self.bird(
            &node.ns,
            &node.name,
            &node_bird_config(node.index, self.opts.steering, self.uplink_as(i)),
        )?;
        self.nodes[i].bird = Some(bird);
        Ok(())
    }

    /// Starts (or restarts) node `i`'s web server. It names itself after the node, in the
    /// `X-Served-By` header and in UDP answers, so a client knows which member served it.
    pub fn start_httpd(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let log = self.dir.join(format!("{}-httpd.log", node.name));
        let size = self.opts.file_size.to_string();
        let seed = self.opts.file_seed.to_string();
        let httpd = spawn(
            &node.ns,
            &format!("httpd ({})", node.name),
            &self.bin.httpd,
            &[
                &[
                    "--size",
                    &size,
                    "--seed",
                    &seed,
                    "--listen",
                    &format!("{VIP_V4}:80"),
                    "--listen",
                    &format!("[{VIP_V6}]:80"),
                    "--udp",
                    &format!("{VIP_V4}:{UDP_PORT}"),
                    "--udp",
                    &format!("[{VIP_V6}]:{UDP_PORT}"),
                    "--name",
                    &node.name,
                ][..],
                &h3_httpd_args(self, i)
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            ]
            .concat(),
            &log,
        )?;
        self.nodes[i].httpd = Some(httpd);
        Ok(())
    }

    /// Kills node `i`'s controller with SIGKILL (its XDP program stays attached through the
    /// pins, as after a crash); [`Lab::start_controller`] starts it again.
    pub fn kill_controller(&mut self, i: usize) {
        self.nodes[i].controller = None;
    }

    /// Kills node `i`'s web server with SIGKILL.
    pub fn kill_httpd(&mut self, i: usize) {
        self.nodes[i].httpd = None;
    }

    /// Kills node `i`'s BIRD with SIGKILL: it leaves its socket file behind, and the router
    /// loses the node's sessions after the hold time.
    pub fn kill_bird(&mut self, i: usize) {
        if let Some(bird) = self.nodes[i].bird.as_mut() {
            bird.kill();
        }
    }

    /// Starts node `i`'s BIRD again, with the same files; returns once it answers. The
    /// controller, if it runs, announces the VIPs again on its next BIRD poll.
    pub fn restart_bird(&mut self, i: usize) -> Result<()> {
        match self.nodes[i].bird.as_mut() {
            Some(bird) => bird
                .restart()
                .with_context(|| format!("restarting {}'s BIRD", self.nodes[i].name)),
            None => self.start_node_bird(i),
        }
    }

    /// Stops node `i` entirely: controller, web server and BIRD (by pid, SIGKILL).
    pub fn stop_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.controller = None;
        node.httpd = None;
        node.bird = None;
    }

    /// Starts everything of node `i` that is not running: BIRD, the web server and (in a
    /// steering lab) the controller.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        if !self.nodes[i].bird.as_mut().is_some_and(|b| b.is_running()) {
            self.restart_bird(i)?;
        }
        if !self.nodes[i].httpd.as_mut().is_some_and(|p| p.is_running()) {
            self.start_httpd(i)?;
        }
        if self.opts.steering && !self.controller_running(i) {
            self.start_controller(i)?;
        }
        Ok(())
    }

    /// Whether node `i`'s controller process runs.
    pub fn controller_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .controller
            .as_mut()
            .is_some_and(|p| p.is_running())
    }
}
