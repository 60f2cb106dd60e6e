#!/usr/bin/perl
# The system test's HTTP destination: an internal API, run inside the container
# (perl-base only: the minbase root file system has no Python).
#
#   receiver.pl PORT DIR
#
# Each request's X-Faceio-Relay-Event-Id is appended to a log in DIR:
# - while DIR/hold exists, a request is held (a slow API): its ID goes to DIR/held and
#   it gets no answer until DIR/hold is removed (then 200, ID to DIR/answered) or the
#   client closes the connection (nothing answered: the delivery was cut off);
# - otherwise it is answered 200 at once and its ID goes to DIR/answered.
# DIR/answered therefore lists the deliveries that really got a 200.
use strict;
use warnings;
use IO::Select;
use IO::Socket::INET;

my ($port, $dir) = @ARGV;
die "usage: receiver.pl PORT DIR\n" unless defined $dir;
$SIG{CHLD} = 'IGNORE';
my $server = IO::Socket::INET->new(
    LocalAddr => '127.0.0.1',
    LocalPort => $port,
    Listen    => 128,
    ReuseAddr => 1,
) or die "receiver: cannot listen on 127.0.0.1:$port: $!\n";
open my $ready, '>', "$dir/listening" or die "receiver: $dir/listening: $!\n";
close $ready;

while (1) {
    my $client = $server->accept or next;
    my $pid = fork;
    die "receiver: fork: $!\n" unless defined $pid;
    if ($pid) {
        close $client;
        next;
    }
    close $server;
    serve($client);
    exit 0;
}

sub record {
    my ($file, $id) = @_;
    open my $fh, '>>', "$dir/$file" or die "receiver: $dir/$file: $!\n";
    print $fh "$id\n";
    close $fh;
}

sub answer {
    my ($client, $id) = @_;
    print $client "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    close $client or return;
    record('answered', $id);
}

sub serve {
    my ($client) = @_;
    binmode $client;
    local $/ = "\r\n";
    my $request = <$client>;
    return unless defined $request;
    my %headers;
    while (defined(my $line = <$client>)) {
        last if $line eq "\r\n";
        $headers{lc $1} = $2 if $line =~ /^([^:]+):\s*(.*?)\r\n$/;
    }
    my $length = $headers{'content-length'} // 0;
    my $body = '';
    read($client, $body, $length) if $length;
    my $id = $headers{'x-faceio-relay-event-id'} // '-';
    return answer($client, $id) unless -e "$dir/hold";

    record('held', $id);
    my $select = IO::Select->new($client);
    while (-e "$dir/hold") {
        next unless $select->can_read(0.2);
        # Readable with nothing to read: the client closed the connection.
        return unless sysread($client, my $buffer, 4096);
    }
    answer($client, $id);
}
