/* vsockcat: the guest end of the vsock tests (busybox has no AF_VSOCK client).
 *
 *   vsockcat l PORT REPLY   accept one stream on PORT, copy it to stdout until the peer
 *                           shuts down its sending side, then send REPLY and close
 *   vsockcat c CID PORT     connect to CID:PORT, send stdin, shut down the sending side,
 *                           then copy what comes back to stdout
 *
 * Built static by the guest tests (gcc, Debian's libc6-dev) and handed to the guest on a
 * raw disk.
 */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void copy(int in, int out)
{
	char buf[65536];
	ssize_t n;

	while ((n = read(in, buf, sizeof(buf))) > 0) {
		for (ssize_t done = 0; done < n;) {
			ssize_t w = write(out, buf + done, n - done);
			if (w < 0) {
				perror("write");
				exit(1);
			}
			done += w;
		}
	}
	if (n < 0) {
		perror("read");
		exit(1);
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK };
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (s < 0 || argc != 4) {
		fprintf(stderr, "usage: vsockcat l PORT REPLY | c CID PORT\n");
		return 2;
	}
	if (argv[1][0] == 'l') {
		addr.svm_cid = VMADDR_CID_ANY;
		addr.svm_port = atoi(argv[2]);
		if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) || listen(s, 1)) {
			perror("bind/listen");
			return 1;
		}
		int c = accept(s, NULL, NULL);
		if (c < 0) {
			perror("accept");
			return 1;
		}
		copy(c, 1);
		if (write(c, argv[3], strlen(argv[3])) < 0)
			perror("write reply");
		close(c);
	} else {
		addr.svm_cid = atoi(argv[2]);
		addr.svm_port = atoi(argv[3]);
		if (connect(s, (struct sockaddr *)&addr, sizeof(addr))) {
			perror("connect");
			return 1;
		}
		copy(0, s);
		shutdown(s, SHUT_WR);
		copy(s, 1);
	}
	close(s);
	return 0;
}
